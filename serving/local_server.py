"""A TensorFlow-Serving-compatible model server for laptops and tests. Not a replacement for
`tensorflow/serving` (a simpler batching scheduler, no GPU sharing, no model config reloads):
it exists because the real binary cannot be installed everywhere, and it speaks its protocol.

    python -m serving.local_server --model_base_path exports/caption --model_name caption \\
        --port 8500 [--rest_port 8501]

Implemented from the real `tensorflow-serving-api` protos, backed by the exported SavedModel:
- gRPC PredictionService `Predict` and `GetModelMetadata`, ModelService `GetModelStatus`;
- REST `POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict` (row `instances` or
  columnar `inputs`, `{"b64": ...}` for bytes), `GET /v1/models/<name>[/versions/<v>]` (status)
  and `GET .../metadata`.

It serves the newest `--num_versions` integer version folders under `--model_base_path`, polls
it every `--poll_seconds`, and picks up a new version without a restart: the new one is loaded
(and its warm-up requests replayed) before it takes traffic, and the old one is dropped only
after that, while requests already running on it finish. Errors carry TensorFlow Serving's
status codes and messages: NOT_FOUND for an unknown model or version, FAILED_PRECONDITION for an
unknown signature (what the real server returns over gRPC; INVALID_ARGUMENT over REST),
INVALID_ARGUMENT for bad inputs, RESOURCE_EXHAUSTED for a message above `--max_message_mb`.
`--enable_batching` merges concurrent requests along the batch dimension (see `Batcher`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

FLAGS = flags.FLAGS

# grpc.StatusCode values by TensorFlow error code (TensorFlow's codes are gRPC's numbering).
_HTTP_STATUS = {3: 400, 5: 404, 9: 400, 4: 504, 8: 429, 14: 503}
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


class ServingError(Exception):
    """A request failure with its gRPC status code (a `grpc.StatusCode`) and message."""

    def __init__(self, code, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _codes():
    import grpc

    return grpc.StatusCode


@dataclasses.dataclass
class Servable:
    version: int
    loaded: object  # the tf.saved_model.load result
    signature_defs: dict  # name -> SignatureDef proto
    batchers: dict = dataclasses.field(default_factory=dict)  # signature -> Batcher

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()


def _signature_defs(path: str) -> dict:
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return {name: sig for name, sig in proto.meta_graphs[0].signature_def.items()
            if not name.startswith("__")}


def clean_tf_message(message: str) -> str:
    """A TensorFlow op error without its graph and stack decorations: one readable line."""
    found = re.search(r"assertion failed: \[(.*?)\]\s*(?:\n|$)", message)
    if found:
        return found.group(1)
    lines = [line.strip() for line in message.split("\n\t [[")[0].splitlines()]
    lines = [line for line in lines if line and not line.startswith(
        ("Graph execution error", "Detected at node", "<stack traces"))]
    return re.sub(r"\{\{function_node [^}]*\}\}\s*", "", lines[-1] if lines else message)


class ModelManager:
    """The loaded versions of one model; `poll` loads new ones and retires old ones."""

    def __init__(self, name: str, base_path: str, num_versions: int = 1,
                 labels: dict[str, int] | None = None, batching: dict | None = None):
        """`batching`: None, or Batcher settings {max_batch_size, timeout, threads}."""
        self.name = name
        self.base_path = base_path
        self.num_versions = num_versions
        self.labels = labels or {}
        self.batching = batching
        self._lock = threading.Lock()
        self._served: dict[int, Servable] = {}
        self._states: dict[int, tuple[str, str]] = {}  # version -> (state, error message)

    def versions_on_disk(self) -> list[int]:
        if not os.path.isdir(self.base_path):
            return []
        return sorted(int(n) for n in os.listdir(self.base_path) if n.isdigit()
                      and os.path.isfile(os.path.join(self.base_path, n, "saved_model.pb")))

    def poll(self) -> None:
        """Loads the newest versions not loaded yet, then drops the ones no longer wanted."""
        wanted = self.versions_on_disk()[-self.num_versions:]
        for version in wanted:
            if version in self._served or self._states.get(version, ("",))[0] == "END":
                continue
            self._load(version)
        with self._lock:
            keep = set(wanted) if any(v in self._served for v in wanted) else set(self._served)
            for version in [v for v in self._served if v not in keep]:
                # In-flight requests hold their own reference and finish on the old version.
                self._served.pop(version).close()
                self._states[version] = ("END", "")
                logging.info("unloaded %s version %d", self.name, version)

    def _load(self, version: int) -> None:
        import tensorflow as tf

        path = os.path.join(self.base_path, str(version))
        with self._lock:
            self._states[version] = ("LOADING", "")
        try:
            servable = Servable(version, tf.saved_model.load(path), _signature_defs(path))
            if self.batching:
                for signature in servable.signature_defs:
                    servable.batchers[signature] = Batcher(
                        functools.partial(call_signature, servable, signature), **self.batching)
            _replay_warmup(servable, path)
        except Exception as e:  # a broken version must not take the server down
            logging.error("could not load %s: %s", path, e)
            with self._lock:
                self._states[version] = ("END", f"could not load {path}: {e}")
            return
        with self._lock:
            self._served[version] = servable
            self._states[version] = ("AVAILABLE", "")
        logging.info("serving %s version %d from %s", self.name, version, path)

    def resolve(self, model_spec) -> Servable:
        """The servable a request's ModelSpec names, or ServingError(NOT_FOUND...)."""
        codes = _codes()
        if model_spec.name != self.name:
            raise ServingError(codes.NOT_FOUND,
                               f"Servable not found for request: Latest({model_spec.name})")
        choice = model_spec.WhichOneof("version_choice")
        with self._lock:
            if choice == "version":
                version = model_spec.version.value
                if version not in self._served:
                    raise ServingError(codes.NOT_FOUND, f"Servable not found for request: "
                                                        f"Specific({self.name}, {version})")
                return self._served[version]
            if choice == "version_label":
                label = model_spec.version_label
                if label not in self.labels:
                    raise ServingError(codes.INVALID_ARGUMENT,
                                       f"Unrecognized servable version label: {label}")
                version = self.labels[label]
                if version not in self._served:
                    raise ServingError(codes.NOT_FOUND, f"Servable not found for request: "
                                                        f"Specific({self.name}, {version})")
                return self._served[version]
            if not self._served:
                raise ServingError(codes.NOT_FOUND,
                                   f"Servable not found for request: Latest({self.name})")
            return self._served[max(self._served)]

    def available(self) -> list[int]:
        with self._lock:
            return sorted(self._served)

    def status(self, version: int | None = None) -> list[tuple[int, str, str]]:
        """(version, state, error message) for every version seen (or the one asked for)."""
        with self._lock:
            states = dict(self._states)
        if version is not None:
            if version not in states:
                raise ServingError(_codes().NOT_FOUND, f"Could not find version {version} of "
                                                       f"model {self.name}")
            states = {version: states[version]}
        return [(v, *states[v]) for v in sorted(states, reverse=True)]


def _replay_warmup(servable: Servable, path: str) -> None:
    """Runs the export's warm-up requests, as TensorFlow Serving does before serving."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    warmup = os.path.join(path, WARMUP_FILE)
    if not os.path.isfile(warmup):
        return
    for record in tf.data.TFRecordDataset(warmup):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        run_signature(servable, request.model_spec.signature_name,
                      {k: tf.make_ndarray(v) for k, v in request.inputs.items()})


def run_signature(servable: Servable, signature: str, inputs: dict,
                  output_filter=(), rest: bool = False) -> dict:
    """Checks `inputs` (name -> numpy array) against the signature and runs it."""
    import numpy as np
    import tensorflow as tf

    codes = _codes()
    signature = signature or "serving_default"
    if signature not in servable.signature_defs:
        if rest:
            raise ServingError(codes.INVALID_ARGUMENT, f'Serving signature name: "{signature}" '
                                                       "not found in signature def")
        raise ServingError(codes.FAILED_PRECONDITION,
                           f'Serving signature key "{signature}" not found.')
    sig = servable.signature_defs[signature]
    expected = set(sig.inputs)
    if set(inputs) != expected:
        extra, missing = sorted(set(inputs) - expected), sorted(expected - set(inputs))
        raise ServingError(codes.INVALID_ARGUMENT, (
            f"input size does not match signature: {len(inputs)}!={len(expected)} "
            f"len({{{', '.join(sorted(inputs))}}}) != len({{{', '.join(sorted(expected))}}}). "
            f"Sent extra: {{{', '.join(extra)}}}. Missing but required: "
            f"{{{', '.join(missing)}}}."))
    tensors = {}
    for name, value in inputs.items():
        info = sig.inputs[name]
        want = tf.dtypes.as_dtype(info.dtype)
        value = np.asarray(value)
        have = tf.dtypes.as_dtype(value.dtype) if value.dtype != object else tf.string
        if have != want:
            raise ServingError(codes.INVALID_ARGUMENT,
                               f"input '{name}' has type {have.name}, the signature expects "
                               f"{want.name}")
        shape = tf.TensorShape(info.tensor_shape)
        if not shape.is_compatible_with(value.shape):
            raise ServingError(codes.INVALID_ARGUMENT,
                               f"input '{name}' has shape {list(value.shape)}, the signature "
                               f"expects {shape}")
        tensors[name] = value if want != tf.string else value.astype(object)
    unknown = sorted(set(output_filter) - set(sig.outputs))
    if unknown:
        raise ServingError(codes.INVALID_ARGUMENT,
                           f"output tensor alias not found in signature: {unknown[0]} Outputs "
                           f"expected to be in the set {{{','.join(sorted(sig.outputs))}}}.")
    batcher = servable.batchers.get(signature)
    outputs = batcher.submit(tensors) if batcher else call_signature(servable, signature, tensors)
    keep = set(output_filter) or set(outputs)
    return {k: v for k, v in outputs.items() if k in keep}


def call_signature(servable: Servable, signature: str, inputs: dict) -> dict:
    """Runs the signature on checked numpy inputs; TensorFlow errors become ServingErrors."""
    import tensorflow as tf

    codes = _codes()
    try:
        outputs = servable.loaded.signatures[signature](**{
            k: tf.constant(v) for k, v in inputs.items()})
    except tf.errors.OpError as e:
        code = codes.INVALID_ARGUMENT if e.error_code == 3 else {
            c.value[0]: c for c in codes}.get(e.error_code, codes.INTERNAL)
        raise ServingError(code, clean_tf_message(e.message)) from None
    return {k: v.numpy() for k, v in outputs.items()}


class Batcher:
    """Merges concurrent requests to one signature along the batch dimension, as TensorFlow
    Serving's `--enable_batching` does: a batch runs once it holds `max_batch_size` rows or
    `timeout` seconds after its first request, on one of `threads` batch threads. Unlike
    TensorFlow Serving, a merged batch that fails is re-run request by request, so one bad image
    fails only its own request."""

    def __init__(self, call, max_batch_size: int, timeout: float, threads: int):
        self.call, self.max_rows, self.timeout = call, max_batch_size, timeout
        self._pending: list[tuple[dict, int, futures.Future]] = []
        self._ready = threading.Condition()
        self._closed = False
        for _ in range(threads):
            threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, inputs: dict) -> dict:
        rows = {len(v) if getattr(v, "ndim", 0) else -1 for v in inputs.values()}
        if len(rows) != 1 or -1 in rows or next(iter(rows)) > self.max_rows:
            return self.call(inputs)  # not batch-major, or a full batch by itself
        future: futures.Future = futures.Future()
        with self._ready:
            self._pending.append((inputs, rows.pop(), future))
            self._ready.notify()
        return future.result()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _take(self) -> list | None:
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.timeout
            while (sum(r for _, r, _ in self._pending) < self.max_rows
                   and time.monotonic() < deadline):
                self._ready.wait(deadline - time.monotonic())
            batch, rows = [], 0
            while self._pending and rows + self._pending[0][1] <= self.max_rows:
                rows += self._pending[0][1]
                batch.append(self._pending.pop(0))
            return batch

    def _loop(self) -> None:
        import numpy as np

        while (batch := self._take()) is not None:
            if not batch:
                continue
            try:
                merged = {k: np.concatenate([inputs[k] for inputs, _, _ in batch])
                          for k in batch[0][0]}
                outputs = self.call(merged)
            except ServingError:
                for inputs, _, future in batch:  # find the request at fault
                    try:
                        future.set_result(self.call(inputs))
                    except ServingError as e:
                        future.set_exception(e)
                continue
            start = 0
            for _, rows, future in batch:
                future.set_result({k: v[start:start + rows] for k, v in outputs.items()})
                start += rows


# ---------------------------------------------------------------------------------------------
# gRPC
# ---------------------------------------------------------------------------------------------

def _grpc_services(manager: ModelManager):
    import grpc
    import tensorflow as tf
    from google.protobuf import any_pb2
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2,
                                         prediction_service_pb2_grpc)

    def abort(context, error: ServingError):
        context.abort(error.code, error.message)

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            try:
                servable = manager.resolve(request.model_spec)
                outputs = run_signature(
                    servable, request.model_spec.signature_name,
                    {k: tf.make_ndarray(v) for k, v in request.inputs.items()},
                    request.output_filter)
            except ServingError as e:
                abort(context, e)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = manager.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = (request.model_spec.signature_name
                                                  or "serving_default")
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
            return response

        def GetModelMetadata(self, request, context):
            try:
                if list(request.metadata_field) != ["signature_def"]:
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                       "Metadata field signature_def must be the only one "
                                       "requested")
                servable = manager.resolve(request.model_spec)
            except ServingError as e:
                abort(context, e)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            for name, sig in servable.signature_defs.items():
                signatures.signature_def[name].CopyFrom(sig)
            packed = any_pb2.Any()
            packed.Pack(signatures)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = manager.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].CopyFrom(packed)
            return response

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):
            try:
                if request.model_spec.name != manager.name:
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"Could not find any versions of model "
                                       f"{request.model_spec.name}")
                version = (request.model_spec.version.value
                           if request.model_spec.HasField("version") else None)
                statuses = manager.status(version)
            except ServingError as e:
                abort(context, e)
            response = get_model_status_pb2.GetModelStatusResponse()
            for v, state, error in statuses:
                status = response.model_version_status.add()
                status.version = v
                status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
                status.status.error_code = 2 if error else 0
                status.status.error_message = error
            return response

    return PredictionService(), ModelService()


def start_grpc(manager: ModelManager, port: int, max_message_bytes: int, threads: int = 16,
               tls: tuple[bytes, bytes, bytes | None] | None = None):
    """The gRPC server on `port` (0: any free port); returns (server, port)."""
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes)])
    prediction, model = _grpc_services(manager)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(model, server)
    address = f"0.0.0.0:{port}"
    if tls:
        cert, key, client_ca = tls
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca,
            require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    server.start()
    return server, port


# ---------------------------------------------------------------------------------------------
# REST
# ---------------------------------------------------------------------------------------------

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|"
                   r"/labels/(?P<label>[^/:]+))?(?P<rest>:predict|/metadata)?$")


def _decode_json_value(value):
    """REST JSON -> numpy-ready values: {"b64": ...} becomes bytes, recursively."""
    import base64

    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode_json_value(v) for v in value]
    return value


def _encode_json_value(name: str, value):
    """numpy -> JSON as TensorFlow Serving writes it (bytes as UTF-8 text, or b64 for
    outputs whose name ends in `_bytes`)."""
    import base64

    import numpy as np

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


def rest_predict(manager: ModelManager, spec, body: dict) -> dict:
    """The REST :predict body -> the response body (row or columnar, as sent)."""
    import numpy as np

    codes = _codes()
    servable = manager.resolve(spec)
    signature = body.get("signature_name", "serving_default")
    names = sorted(servable.signature_defs[signature].inputs) \
        if signature in servable.signature_defs else []
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise ServingError(codes.INVALID_ARGUMENT, "'instances' must be a non-empty list")
        if all(isinstance(i, dict) and "b64" not in i for i in instances):
            inputs = {k: [_decode_json_value(i.get(k)) for i in instances]
                      for k in instances[0]}
        elif len(names) == 1:
            inputs = {names[0]: [_decode_json_value(i) for i in instances]}
        else:
            raise ServingError(codes.INVALID_ARGUMENT, "instances without input names need a "
                                                       "signature with exactly one input")
        row = True
    elif "inputs" in body:
        raw = body["inputs"]
        inputs = ({k: _decode_json_value(v) for k, v in raw.items()} if isinstance(raw, dict)
                  else {names[0] if len(names) == 1 else "": _decode_json_value(raw)})
        row = False
    else:
        raise ServingError(codes.INVALID_ARGUMENT,
                           "Missing 'inputs' or 'instances' key in the request body")
    arrays = {}
    for name, value in inputs.items():
        info = servable.signature_defs[signature].inputs.get(name) \
            if signature in servable.signature_defs else None
        if info is not None and info.dtype == 7:  # DT_STRING
            arrays[name] = np.array(value, dtype=object)
        elif info is not None:
            import tensorflow as tf

            arrays[name] = np.array(value, dtype=tf.dtypes.as_dtype(info.dtype).as_numpy_dtype)
        else:
            arrays[name] = np.array(value)
    outputs = run_signature(servable, signature, arrays, rest=True)
    if not row:
        return {"outputs": {k: _encode_json_value(k, v) for k, v in outputs.items()}}
    count = len(next(iter(outputs.values())))
    return {"predictions": [{k: _encode_json_value(k, v[i]) for k, v in outputs.items()}
                            for i in range(count)]}


def rest_status(manager: ModelManager, version: int | None) -> dict:
    return {"model_version_status": [
        {"version": str(v), "state": state,
         "status": {"error_code": "UNKNOWN" if error else "OK", "error_message": error}}
        for v, state, error in manager.status(version)]}


def rest_metadata(manager: ModelManager, spec) -> dict:
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2

    servable = manager.resolve(spec)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    for name, sig in servable.signature_defs.items():
        signatures.signature_def[name].CopyFrom(sig)
    return {"model_spec": {"name": manager.name, "signature_name": "",
                           "version": str(servable.version)},
            "metadata": {"signature_def": json_format.MessageToDict(signatures)}}


def start_rest(manager: ModelManager, port: int, max_body_bytes: int):
    """The REST server on `port` (0: any free port), in a thread; returns (server, port)."""
    from tensorflow_serving.apis import model_pb2

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # requests are not logged, as in TF Serving
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str):
            codes = _codes()
            match = _PATH.match(self.path)
            if not match or (method == "POST") != (match["rest"] == ":predict"):
                return self._reply(404, {"error": f"Malformed request: {method} {self.path}"})
            spec = model_pb2.ModelSpec(name=match["name"])
            if match["version"]:
                spec.version.value = int(match["version"])
            if match["label"]:
                spec.version_label = match["label"]
            try:
                if method == "GET" and match["rest"] == "/metadata":
                    return self._reply(200, rest_metadata(manager, spec))
                if method == "GET":
                    if match["name"] != manager.name:
                        raise ServingError(codes.NOT_FOUND, f"Could not find any versions of "
                                                            f"model {match['name']}")
                    version = int(match["version"]) if match["version"] else None
                    return self._reply(200, rest_status(manager, version))
                length = int(self.headers.get("Content-Length") or 0)
                if length > max_body_bytes:
                    raise ServingError(codes.RESOURCE_EXHAUSTED,
                                       f"request body of {length} bytes is above the limit "
                                       f"of {max_body_bytes}")
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError as e:
                    raise ServingError(codes.INVALID_ARGUMENT,
                                       f"JSON Parse error: {e}") from None
                if not isinstance(body, dict):
                    raise ServingError(codes.INVALID_ARGUMENT, "the request body must be a "
                                                               "JSON object")
                return self._reply(200, rest_predict(manager, spec, body))
            except ServingError as e:
                return self._reply(_HTTP_STATUS.get(e.code.value[0], 500), {"error": e.message})

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def _labels(text: str) -> dict[str, int]:
    labels = {}
    for item in filter(None, text.split(",")):
        name, _, version = item.partition("=")
        if not version.isdigit():
            raise ValueError(f"--version_labels: {item!r} is not label=version")
        labels[name] = int(version)
    return labels


def define_flags() -> None:
    flags.DEFINE_string("model_base_path", None, "Folder of integer version folders (what "
                        "python -m dist_caption.export writes).")
    flags.DEFINE_string("model_name", "caption", "Name clients ask for.")
    flags.DEFINE_integer("port", 8500, "gRPC port (0: any free port).")
    flags.DEFINE_integer("rest_port", None, "REST port (TF Serving uses 8501; 0: any free port; "
                         "unset: no REST API).")
    flags.DEFINE_integer("num_versions", 1, "Serve the newest N versions (TF Serving's "
                         "'latest' version policy).")
    flags.DEFINE_string("version_labels", "", "label=version,... (e.g. stable=1,canary=2).")
    flags.DEFINE_float("poll_seconds", 1.0, "How often to look for new versions "
                       "(TF Serving's --file_system_poll_wait_seconds).")
    flags.DEFINE_integer("max_message_mb", 64, "Largest request accepted, in MiB.")
    flags.DEFINE_integer("threads", 16, "Requests served at once.")
    flags.DEFINE_bool("enable_batching", False, "Merge concurrent requests into batches (as "
                      "TensorFlow Serving's --enable_batching).")
    flags.DEFINE_integer("max_batch_size", 64, "Most rows in a merged batch.")
    flags.DEFINE_integer("batch_timeout_micros", 2000, "How long a batch waits to fill up.")
    flags.DEFINE_integer("num_batch_threads", 2, "Batches run at once.")
    flags.DEFINE_string("ssl_cert", None, "PEM server certificate (with --ssl_key): gRPC TLS.")
    flags.DEFINE_string("ssl_key", None, "PEM private key of --ssl_cert.")
    flags.DEFINE_string("ssl_client_ca", None, "PEM CA of client certificates: mutual TLS.")
    flags.DEFINE_string("ready_file", None, "Written with the ports once the first version is "
                        "served (for scripts and tests).")
    flags.mark_flag_as_required("model_base_path")
    flags.register_validator("version_labels", lambda v: bool(_labels(v)) or not v,
                             message="--version_labels must be label=version,...")


def main(argv: list[str]) -> None:
    del argv
    from dist_caption.errors import UserError

    logging.set_verbosity(logging.INFO)
    batching = (dict(max_batch_size=FLAGS.max_batch_size,
                     timeout=FLAGS.batch_timeout_micros / 1e6, threads=FLAGS.num_batch_threads)
                if FLAGS.enable_batching else None)
    manager = ModelManager(FLAGS.model_name, FLAGS.model_base_path, FLAGS.num_versions,
                           _labels(FLAGS.version_labels), batching)
    tls = None
    if FLAGS.ssl_cert or FLAGS.ssl_key:
        if not (FLAGS.ssl_cert and FLAGS.ssl_key):
            raise UserError("--ssl_cert and --ssl_key go together")
        read = lambda p: open(p, "rb").read()  # noqa: E731
        tls = (read(FLAGS.ssl_cert), read(FLAGS.ssl_key),
               read(FLAGS.ssl_client_ca) if FLAGS.ssl_client_ca else None)
    manager.poll()
    if not manager.versions_on_disk():
        logging.warning("no version under %s yet: waiting for one", FLAGS.model_base_path)
    limit = FLAGS.max_message_mb << 20
    try:
        server, port = start_grpc(manager, FLAGS.port, limit, FLAGS.threads, tls)
    except RuntimeError as e:
        raise UserError(f"cannot listen on gRPC port {FLAGS.port} ({e}): is another server "
                        "running? choose another --port") from None
    rest, rest_port = (start_rest(manager, FLAGS.rest_port, limit)
                       if FLAGS.rest_port is not None else (None, None))
    print(f"serving {FLAGS.model_name} from {FLAGS.model_base_path}: gRPC :{port}"
          + (f", REST :{rest_port}" if rest else ""), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ready_written = False
    while not stop.is_set():
        if FLAGS.ready_file and not ready_written and manager.available():
            with open(FLAGS.ready_file + ".tmp", "w") as f:
                json.dump({"port": port, "rest_port": rest_port, "pid": os.getpid()}, f)
            os.replace(FLAGS.ready_file + ".tmp", FLAGS.ready_file)
            ready_written = True
        stop.wait(FLAGS.poll_seconds)
        if not stop.is_set():
            manager.poll()
    server.stop(grace=5).wait()
    if rest:
        rest.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    from dist_caption import cli

    define_flags()
    cli.run(main)
