"""Merging concurrent requests into one batch, as TensorFlow Serving's `--enable_batching` does.

Checked against tensorflow_serving/batching/batching_session.cc,
tensorflow_serving/servables/tensorflow/bundle_factory_util.cc (`WrapSessionForBatching`) and
tensorflow/core/kernels/batching_util/shared_batch_scheduler.h; the README's fidelity record
says where this differs.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures

import grpc
import numpy as np
from absl import logging
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf import wrappers_pb2

from serving.local_server.signatures import ServingError

# SharedBatchScheduler's defaults for fields a --batching_parameters_file leaves unset
# (tensorflow/core/kernels/batching_util/shared_batch_scheduler.h QueueOptions).
DEFAULT_MAX_BATCH_SIZE = 1000
DEFAULT_BATCH_TIMEOUT_MICROS = 0


def _batching_parameters_class():
    """tensorflow.serving.BatchingParameters, declared as in
    tensorflow_serving/servables/tensorflow/session_bundle_config.proto (the pip package
    tensorflow-serving-api does not ship that proto), so a file TF Serving reads parses here
    with the same field names, types and errors."""
    file = descriptor_pb2.FileDescriptorProto(
        name="dist_caption/batching_parameters.proto", package="tensorflow.serving",
        syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    message = file.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    for name, number, kind in (("max_batch_size", 1, "Int64Value"),
                               ("batch_timeout_micros", 2, "Int64Value"),
                               ("max_enqueued_batches", 3, "Int64Value"),
                               ("num_batch_threads", 4, "Int64Value"),
                               ("thread_pool_name", 5, "StringValue"),
                               ("enable_large_batch_splitting", 8, "BoolValue"),
                               ("max_execution_batch_size", 9, "Int64Value")):
        message.field.add(name=name, number=number, type=field.TYPE_MESSAGE,
                          type_name=f".google.protobuf.{kind}", label=field.LABEL_OPTIONAL)
    message.field.add(name="allowed_batch_sizes", number=6, type=field.TYPE_INT64,
                      label=field.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL,
                      label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(
        "tensorflow.serving.BatchingParameters"))


BatchingParameters = _batching_parameters_class()


def read_batching_parameters(path: str) -> dict:
    """Batcher settings from a TensorFlow Serving `--batching_parameters_file` (a text
    BatchingParameters proto); unset fields take SharedBatchScheduler's defaults. Raises
    ValueError naming the file for what does not parse or what this server does not do."""
    try:
        with open(path, encoding="utf-8") as f:
            params = text_format.Parse(f.read(), BatchingParameters())
    except OSError as e:
        raise ValueError(f"cannot read --batching_parameters_file {path}: {e.strerror}") from None
    except text_format.ParseError as e:
        raise ValueError(f"--batching_parameters_file {path} is not a BatchingParameters text "
                         f"proto: {e}") from None
    if params.pad_variable_length_inputs or params.enable_large_batch_splitting.value:
        raise ValueError(f"--batching_parameters_file {path}: pad_variable_length_inputs and "
                         "enable_large_batch_splitting are not implemented by the local server; "
                         "set them false")
    if params.HasField("max_enqueued_batches"):
        logging.info("max_enqueued_batches (%d) is not enforced by the local server",
                     params.max_enqueued_batches.value)
    return dict(
        max_batch_size=(params.max_batch_size.value if params.HasField("max_batch_size")
                        else DEFAULT_MAX_BATCH_SIZE),
        timeout=(params.batch_timeout_micros.value if params.HasField("batch_timeout_micros")
                 else DEFAULT_BATCH_TIMEOUT_MICROS) / 1e6,
        threads=(params.num_batch_threads.value if params.HasField("num_batch_threads")
                 else os.cpu_count() or 1),
        allowed_batch_sizes=tuple(params.allowed_batch_sizes))


class Batcher:
    """Merges concurrent requests to one signature along the batch dimension, as TensorFlow
    Serving's `--enable_batching` does: a batch runs once it holds `max_batch_size` rows or
    `timeout` seconds after its first request, on one of `threads` batch threads. As there,
    a request larger than `max_batch_size` or whose inputs differ in their first dimension is
    refused, and a merged batch that fails fails every request in it with the same error.
    With `allowed_batch_sizes` a merged batch is padded up to the smallest allowed size that
    holds it (copies of the last request's first row; their outputs are dropped), so an XLA
    model only ever sees those shapes; the last allowed size must be `max_batch_size`."""

    def __init__(self, call, max_batch_size: int, timeout: float, threads: int,
                 allowed_batch_sizes: tuple[int, ...] = ()):
        if allowed_batch_sizes and allowed_batch_sizes[-1] != max_batch_size:
            # bundle_factory_util.cc WrapSessionForBatching: a load-time INVALID_ARGUMENT.
            raise ValueError("Last entry in allowed_batch_sizes must match max_batch_size; "
                             f"last entry was {allowed_batch_sizes[-1]}; expected "
                             f"{max_batch_size}")
        self.call, self.max_rows, self.timeout = call, max_batch_size, timeout
        self.allowed = tuple(allowed_batch_sizes)
        self._pending: list[tuple[dict, int, futures.Future]] = []
        self._ready = threading.Condition()
        self._closed = False
        for _ in range(threads):
            threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, inputs: dict) -> dict:
        """Runs `inputs` in a merged batch and returns this request's rows of the outputs."""
        if any(np.ndim(v) == 0 for v in inputs.values()):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Batching Run() input tensors "
                                                                 "must have at least one dimension")
        rows = {len(v) for v in inputs.values()}
        if len(rows) != 1:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Batching Run() input tensors "
                                                                 "must have equal 0th-dimension "
                                                                 "size")
        size = rows.pop()
        if size > self.max_rows:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Task size {size} is larger "
                               f"than maximum input batch size {self.max_rows}")
        future: futures.Future = futures.Future()
        with self._ready:
            if self._closed:  # a retired version finishes this request without batching
                future = None
            else:
                self._pending.append((inputs, size, future))
                self._ready.notify()
        return self.call(inputs) if future is None else future.result()

    def close(self) -> None:
        """Runs what is queued, then stops the batch threads."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _take(self) -> list | None:
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if not self._pending:  # closed, and every queued request has run
                return None
            deadline = time.monotonic() + self.timeout
            while (sum(r for _, r, _ in self._pending) < self.max_rows
                   and time.monotonic() < deadline and not self._closed):
                self._ready.wait(deadline - time.monotonic())
            batch, rows = [], 0
            while self._pending and rows + self._pending[0][1] <= self.max_rows:
                rows += self._pending[0][1]
                batch.append(self._pending.pop(0))
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            try:
                merged = _merge([inputs for inputs, _, _ in batch])
                outputs = self.call(_pad(merged, batch[-1][0], sum(r for _, r, _ in batch),
                                         self.allowed))
            except ServingError as e:
                for _, _, future in batch:
                    future.set_exception(e)
                continue
            start = 0
            for _, rows, future in batch:
                future.set_result({k: v[start:start + rows] for k, v in outputs.items()})
                start += rows


def _merge(requests: list[dict]) -> dict:
    """The requests' inputs concatenated along dimension 0 (batching_session.cc)."""
    merged = {}
    for name in requests[0]:
        if len({np.shape(r[name])[1:] for r in requests}) > 1:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, (
                f"Tensors with name '{name}' from different tasks have different shapes and "
                "padding is turned off. Set pad_variable_length_inputs to true, or ensure that "
                "all tensors with the same name have equal dimensions starting with the first "
                "dim."))
        merged[name] = np.concatenate([r[name] for r in requests])
    return merged


def _pad(merged: dict, last: dict, rows: int, allowed: tuple[int, ...]) -> dict:
    """`merged` (`rows` rows) padded to the smallest of `allowed` >= rows with copies of the
    first row of `last`, the batch's last request (batching_session.cc: `AddPadding`, padding
    taken from `tensor_vec.back().Slice(0, 1)`)."""
    target = next((size for size in allowed if size >= rows), rows)
    if target == rows:
        return merged
    return {name: np.concatenate([value, np.repeat(last[name][:1], target - rows, axis=0)])
            for name, value in merged.items()}
