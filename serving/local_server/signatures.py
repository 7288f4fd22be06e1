"""Requests checked against a SignatureDef, and failures as TensorFlow Serving reports them.

Checked against tensorflow_serving/servables/tensorflow/predict_util.cc (signature lookup,
input names, output filter) and tensorflow/core/common_runtime (feed dtypes); the README's
fidelity record says where this differs.
"""

from __future__ import annotations

import re

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

DEFAULT_SIGNATURE = "serving_default"
# TensorFlow's error codes are gRPC's numbering; REST answers with these HTTP statuses
# (tensorflow_serving/model_servers/http_server.cc ToHTTPStatusCode).
_HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
                grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404,
                grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
                grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
                grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
                grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.CANCELLED: 499}
_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request failure with its `grpc.StatusCode` and TensorFlow Serving's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)


def clean_tf_message(message: str) -> str:
    """A TensorFlow op error without its graph and stack decorations: one readable line."""
    found = re.search(r"assertion failed: \[(.*?)\]\s*(?:\n|$)", message)
    if found:
        return found.group(1)
    lines = [line.strip() for line in message.split("\n\t [[")[0].splitlines()]
    lines = [line for line in lines if line and not line.startswith(
        ("Graph execution error", "Detected at node", "<stack traces"))]
    return re.sub(r"\{\{function_node [^}]*\}\}\s*", "", lines[-1] if lines else message)


def from_tf_error(error: tf.errors.OpError) -> ServingError:
    """A TensorFlow op error as the status a server returns for it."""
    return ServingError(_BY_VALUE.get(error.error_code, grpc.StatusCode.INTERNAL),
                        clean_tf_message(error.message))


def find(signature_defs: dict, name: str, rest: bool = False):
    """The SignatureDef called `name` ("" is serving_default), or TF Serving's error."""
    name = name or DEFAULT_SIGNATURE
    if name not in signature_defs:
        if rest:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f'Serving signature name: "{name}" not found in signature def')
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                           f'Serving signature key "{name}" not found.')
    return signature_defs[name]


def dtype_string(dtype: tf.DType) -> str:
    """TensorFlow's DataTypeString: float, double, int32, string, ..."""
    return types_pb2.DataType.Name(dtype.as_datatype_enum)[3:].lower()


def check_inputs(signature_def, inputs: dict, output_filter=()) -> dict:
    """`inputs` (name -> numpy array) checked against the SignatureDef: the feeds to run.

    The checks and messages of predict_util.cc (input count, output filter), TensorFlow's
    GetInputValues (input names; an input left out takes the SignatureDef's default, as
    TensorFlow Serving has done since 2.14) and FunctionCallFrame::SetArgs (dtypes: a Python
    Session would otherwise convert a fed float array to int silently, which TensorFlow Serving
    never does). The shape check is this server's own: TensorFlow Serving lets the graph fail.
    """
    expected, sent = sorted(signature_def.inputs), sorted(inputs)
    defaults = signature_def.defaults
    if len(sent) > len(expected) or (len(sent) < len(expected) and not defaults):
        extra = [k for k in sent if k not in signature_def.inputs]
        missing = [k for k in expected if k not in inputs]
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, (
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sent)}}}) != len({{{','.join(expected)}}}). "
            f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}."))
    feeds = {}
    for position, name in enumerate(expected):
        info = signature_def.inputs[name]
        if name in inputs:
            value = np.asarray(inputs[name])
        elif name in defaults:
            value = tf.make_ndarray(defaults[name])
        else:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, (
                f"Signature input alias: {name}(feed name: {info.name}) not found in request "
                f"and no default value provided. Inputs expected to be in the request "
                f"{{{','.join(sent)}}}, or default input alias set: "
                f"{','.join(sorted(defaults))}"))
        want = tf.dtypes.as_dtype(info.dtype)
        have = tf.string if value.dtype.kind in "OSU" else tf.dtypes.as_dtype(value.dtype)
        if have != want:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Expects arg[{position}] to be {dtype_string(want)} but "
                               f"{dtype_string(have)} is provided")
        shape = tf.TensorShape(info.tensor_shape)
        if not shape.is_compatible_with(value.shape):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input '{name}' has shape {list(value.shape)}, the signature "
                               f"expects {shape}")
        feeds[name] = value.astype(object) if want == tf.string else value
    used = [k for k in sent if k in signature_def.inputs]
    if inputs and len(used) != len(sent):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, (
            f"Inputs contains invalid name. Used request inputs: {','.join(used)}, request "
            f"input: {','.join(sent)}"))
    outputs = ",".join(sorted(signature_def.outputs))
    for alias in output_filter:
        if alias not in signature_def.outputs:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"output tensor alias not found in signature: {alias} Outputs "
                               f"expected to be in the set {{{outputs}}}.")
    if len(set(output_filter)) != len(output_filter):
        duplicate = next(a for a in output_filter if list(output_filter).count(a) > 1)
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"duplicate output tensor alias: {duplicate}")
    return feeds
