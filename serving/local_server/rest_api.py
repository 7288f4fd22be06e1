"""The REST API: `:predict` (row `instances` or columnar `inputs`, `{"b64": ...}` for bytes),
model status and metadata, over HTTP or HTTPS.

Checked against tensorflow_serving/model_servers/http_rest_api_handler.cc (URLs, status and
metadata bodies) and tensorflow_serving/util/json_tensor.cc (row and columnar formats, b64).
TensorFlow Serving's own REST port has no TLS; here `--ssl_cert` also covers it (see the README).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import model_pb2

from serving.local_server import signatures
from serving.local_server.grpc_api import signature_def_map
from serving.local_server.loading import ModelManager
from serving.local_server.signatures import ServingError

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|"
                   r"/labels/(?P<label>[^/:]+))?(?P<rest>:predict|/metadata)?$")


def _decode_json_value(value):
    """REST JSON -> numpy-ready values: {"b64": ...} becomes bytes, recursively."""
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode_json_value(v) for v in value]
    return value


def _encode_json_value(name: str, value):
    """numpy -> JSON as TensorFlow Serving writes it (bytes as UTF-8 text, or b64 for
    outputs whose name ends in `_bytes`)."""
    if isinstance(value, np.ndarray):
        return [_encode_json_value(name, v) for v in value] if value.ndim else \
            _encode_json_value(name, value.item())
    if isinstance(value, bytes):
        if name.endswith("_bytes"):
            return {"b64": base64.b64encode(value).decode()}
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


_JSON_TYPE = {type(None): "Null", dict: "Object", list: "Array", str: "String", bytes: "String",
              int: "Number", float: "Number"}


def _check_json_values(value, dtype: tf.DType) -> None:
    """json_tensor.cc's AddValueToTensor: every leaf must be of the signature's dtype."""
    if isinstance(value, list):
        for item in value:
            _check_json_values(item, dtype)
        return
    if dtype == tf.string:
        ok = isinstance(value, (str, bytes))
    elif dtype == tf.bool:
        ok = isinstance(value, bool)
    elif dtype.is_integer:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        kind = str(value) if isinstance(value, bool) else _JSON_TYPE.get(type(value), "Object")
        shown = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"JSON Value: {json.dumps(shown)} Type: {kind} is not of expected "
                           f"type: {signatures.dtype_string(dtype)}")


def _arrays(signature_def, inputs: dict, row: bool) -> dict:
    """Decoded JSON values as numpy arrays of the signature's dtypes (unknown names as they
    are, for the signature check to name)."""
    arrays = {}
    for name, value in inputs.items():
        info = signature_def.inputs.get(name) if signature_def is not None else None
        if info is None:
            arrays[name] = np.array(value, dtype=object)
            continue
        dtype = tf.dtypes.as_dtype(info.dtype)
        items = value if row else [value]
        for index, item in enumerate(items):
            try:
                _check_json_values(item, dtype)
            except ServingError as e:
                if not row:
                    raise
                raise ServingError(e.code, f"Failed to process element: {index} key: {name} of "
                                           f"'instances' list. Error: INVALID_ARGUMENT: "
                                           f"{e.message}") from None
        arrays[name] = np.array(value, dtype=object if dtype == tf.string
                                else dtype.as_numpy_dtype)
    return arrays


def predict(manager: ModelManager, spec, body: dict) -> dict:
    """The REST :predict body -> the response body (row or columnar, as sent)."""
    servable = manager.resolve(spec)
    signature = body.get("signature_name", signatures.DEFAULT_SIGNATURE)
    signature_def = servable.signature_defs.get(signature)
    names = sorted(signature_def.inputs) if signature_def is not None else []
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "'instances' must be a non-empty list")
        # json_tensor.cc: named instances must each name every input of the signature (its
        # defaults are for gRPC only); plain ones only serve a one-input signature.
        if all(isinstance(i, dict) and "b64" not in i for i in instances):
            for index, instance in enumerate(instances):
                if names and sorted(instance) != names:
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, (
                        f"Failed to process element: {index} of 'instances' list. JSON object: "
                        f"{json.dumps(instance, separators=(',', ':'))} keys must be equal to: "
                        f"{','.join(names)}"))
            inputs = {k: [_decode_json_value(i.get(k)) for i in instances]
                      for k in instances[0]}
        elif len(names) == 1:
            inputs = {names[0]: [_decode_json_value(i) for i in instances]}
        else:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, (
                "instances is a plain list, but expecting list of objects as multiple input "
                "tensors required as per tensorinfo_map"))
        row = True
    elif "inputs" in body:
        raw = body["inputs"]
        if isinstance(raw, dict) and "b64" not in raw:
            missing = [k for k in names if k not in raw]
            if missing:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Missing named input: {missing[0]} in 'inputs' object.")
            # Only the signature's inputs are read; other keys are ignored, as json_tensor.cc does.
            inputs = {k: _decode_json_value(v) for k, v in raw.items() if k in names or not names}
        elif len(names) > 1:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, (
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"))
        else:
            inputs = {names[0] if names else "": _decode_json_value(raw)}
        row = False
    else:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           "Missing 'inputs' or 'instances' key")
    outputs = servable.predict(signature, _arrays(signature_def, inputs, row), rest=True)
    # A lone output is written without its name, in both formats (json_tensor.cc's
    # `elements_are_objects = tensor_map.size() > 1`).
    named = len(outputs) > 1
    if not row:
        if not named:
            (name, value), = outputs.items()
            return {"outputs": _encode_json_value(name, value)}
        return {"outputs": {k: _encode_json_value(k, v) for k, v in outputs.items()}}
    count = len(next(iter(outputs.values())))
    rows = [{k: _encode_json_value(k, v[i]) for k, v in outputs.items()} for i in range(count)]
    return {"predictions": rows if named else [next(iter(r.values())) for r in rows]}


def status(manager: ModelManager, version: int | None) -> dict:
    return {"model_version_status": [
        {"version": str(v), "state": state,
         "status": {"error_code": code.name, "error_message": error}}
        for v, state, code, error in manager.status(version)]}


def metadata(manager: ModelManager, spec) -> dict:
    servable = manager.resolve(spec)
    return {"model_spec": {"name": manager.name, "signature_name": "",
                           "version": str(servable.version)},
            "metadata": {"signature_def": json_format.MessageToDict(signature_def_map(servable))}}


def start_rest(manager: ModelManager, port: int, max_body_bytes: int,
               tls: ssl.SSLContext | None = None):
    """The REST server on `port` (0: any free port), in a thread; returns (server, port).
    With `tls` (see `server_tls_context`) it speaks HTTPS only."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # requests are not logged, as in TF Serving
            pass

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str):
            match = _PATH.match(self.path)
            if not match or (method == "POST") != (match["rest"] == ":predict"):
                if not self.path.lower().startswith("/v1/"):
                    return self.send_error(404)  # TF Serving: libevent's HTML page
                return self._reply(400, {"error": f"Malformed request: {method} {self.path}"})
            spec = model_pb2.ModelSpec(name=match["name"])
            if match["version"]:
                spec.version.value = int(match["version"])
            if match["label"]:
                spec.version_label = match["label"]
            try:
                if method == "GET" and match["rest"] == "/metadata":
                    return self._reply(200, metadata(manager, spec))
                if method == "GET":
                    if match["name"] != manager.name:
                        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any "
                                           f"versions of model {match['name']}")
                    version = int(match["version"]) if match["version"] else None
                    return self._reply(200, status(manager, version))
                length = int(self.headers.get("Content-Length") or 0)
                if length > max_body_bytes:
                    raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"request body of {length} bytes is above the limit "
                                       f"of {max_body_bytes}")
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError as e:
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"JSON Parse error: {e}") from None
                if not isinstance(body, dict):
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                       "the request body must be a JSON object")
                return self._reply(200, predict(manager, spec, body))
            except ServingError as e:
                return self._reply(e.http_status, {"error": e.message})

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

    server = _Server(("0.0.0.0", port), Handler)
    server.tls = tls
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


class _Server(ThreadingHTTPServer):
    """One thread per connection; with `tls`, the handshake runs in that thread, so a slow or
    refused client never holds up the others."""
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def get_request(self):
        sock, address = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            super().handle_error(request, client_address)


def server_tls_context(cert_file: str, key_file: str,
                       client_ca_file: str | None = None) -> ssl.SSLContext:
    """HTTPS settings: the server's certificate and key; with a client CA, mutual TLS (a client
    without a certificate signed by it is refused during the handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
