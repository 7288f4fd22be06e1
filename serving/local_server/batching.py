"""Merging concurrent requests into one batch, as TensorFlow Serving's `--enable_batching` does.

Checked against tensorflow_serving/batching/batching_session.cc and
tensorflow/core/kernels/batching_util/shared_batch_scheduler.h; the README's fidelity record
says where this differs.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np

from serving.local_server.signatures import ServingError


class Batcher:
    """Merges concurrent requests to one signature along the batch dimension, as TensorFlow
    Serving's `--enable_batching` does: a batch runs once it holds `max_batch_size` rows or
    `timeout` seconds after its first request, on one of `threads` batch threads. As there,
    a request larger than `max_batch_size` or whose inputs differ in their first dimension is
    refused, and a merged batch that fails fails every request in it with the same error."""

    def __init__(self, call, max_batch_size: int, timeout: float, threads: int):
        self.call, self.max_rows, self.timeout = call, max_batch_size, timeout
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
                outputs = self.call(_merge([inputs for inputs, _, _ in batch]))
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
