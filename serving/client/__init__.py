"""Caption images with a model served by TensorFlow Serving (or `serving.local_server`).

    python -m serving.client img.jpg [more.jpg ...] [--server host:8500] [--model_name caption]
        [--signature serving_default] [--version N | --version_label stable] [--timeout 30]
        [--beam N [--length_penalty A]] [--max_length N] [--min_length N] [--no_repeat_ngram N]
        [--repetition_penalty R] [--tls --ca_cert ca.pem [--client_cert c.pem --client_key k.pem]]
        [--json]
    python -m serving.client --model_card [--server ...] [--version N]   # what is served
    python -m serving.client img.jpg --rest http://host:8501
    python -m serving.client img.jpg --rest https://host:8501 --ca_cert ca.pem [--client_cert ...]

gRPC uses the PredictionService `Predict` of `tensorflow-serving-api`, all images in one
request; REST posts `{"instances": [...]}`, one row per image naming every input
(`{"image_bytes": {"b64": ...}, "max_length": 0, ...}`). The decoding controls (`--max_length`,
`--min_length`, `--no_repeat_ngram`, `--repetition_penalty`, and `--length_penalty` with
`--beam`) are checked by the model itself: a bad value is the server's INVALID_ARGUMENT (exit
6). UNAVAILABLE is retried with exponential backoff inside the deadline. Each failure is one line on stderr and an exit status:

| status | failure                                                        |
|--------|----------------------------------------------------------------|
| 2      | bad options, or an image file that cannot be read             |
| 3      | the server cannot be reached (within the deadline)            |
| 4      | model, version, label or signature not found on the server    |
| 5      | deadline exceeded (`--timeout`)                                |
| 6      | the server rejected the request (a bad image, named by file)   |
| 7      | any other server error                                         |

As a library:

    >>> from serving.client import CaptionClient                    # doctest: +SKIP
    >>> CaptionClient("localhost:8500").caption(["cat.jpg"])[0]["caption"]  # doctest: +SKIP
    'a cat on a sofa'
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
import time
import ssl
import urllib.error
import urllib.request

from serving import DEFAULT_MODEL_NAME, config, contract
from serving import cli
from serving.cli import CommandError

DEFAULT_SERVER = config.DEFAULT_SERVER
DEFAULT_SIGNATURE = contract.DEFAULT
BEAM_SIGNATURE = contract.BEAM_SEARCH
MAX_MESSAGE_BYTES = 256 << 20  # large images fit; the server keeps its own limit
OUTPUTS = contract.CAPTION_OUTPUTS

EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_FOUND, EXIT_DEADLINE, EXIT_REJECTED, EXIT_SERVER = (
    2, 3, 4, 5, 6, 7)


class ClientError(CommandError):
    """A failure a user can act on: `str(error)` is the one line, `exit_code` the status."""


@dataclasses.dataclass
class TLS:
    ca_cert: str | None = None  # PEM of the CA that signed the server (None: system roots)
    client_cert: str | None = None  # PEM client certificate for mutual TLS
    client_key: str | None = None


def read_file(path: str, what: str = "image") -> bytes:
    return cli.read_file(path, what, ClientError)


class CaptionClient:
    """Captions images over gRPC (`server` = host:port) or REST (`rest` = http://host:port)."""

    def __init__(self, server: str = DEFAULT_SERVER, model_name: str = DEFAULT_MODEL_NAME,
                 signature: str = DEFAULT_SIGNATURE, version: int | None = None,
                 version_label: str | None = None, timeout: float = 30.0,
                 tls: TLS | None = None, rest: str | None = None):
        if version is not None and version_label:
            raise ClientError("pass --version or --version_label, not both", EXIT_USAGE)
        self.server, self.model_name, self.signature = server, model_name, signature
        self.version, self.version_label = version, version_label
        self.timeout, self.tls, self.rest = timeout, tls, rest
        if rest and tls and not rest.startswith("https://"):
            raise ClientError(f"TLS over REST needs an https:// URL, not --rest {rest}",
                              EXIT_USAGE)
        self._stub = None
        self._channel = None
        self._ssl = None
        self._connected = self._refused = False

    # -- public -----------------------------------------------------------------------------

    def caption(self, images: list, beam: int = 0, controls: dict | None = None) -> list[dict]:
        """One dict per image (bytes or a file path): caption, tokens, log_prob; with `beam`
        also `beams`, every beam's caption and log_prob, best first. `controls` ({name: value}
        of `contract.DEFAULTS`) steer the decoding of every image of the request."""
        names = [i if isinstance(i, str) else f"image {n}" for n, i in enumerate(images)]
        data = [read_file(i) if isinstance(i, str) else bytes(i) for i in images]
        if not data:
            raise ClientError("no images to caption", EXIT_USAGE)
        import numpy as np

        signature = BEAM_SIGNATURE if beam else self.signature
        inputs = {contract.IMAGE_BYTES: np.array(data, dtype=object)}
        if beam:
            inputs[contract.BEAM_WIDTH] = np.full([len(data)], beam, np.int32)
        controls = controls or {}
        optional = contract.optional_inputs(signature)
        unknown = sorted(set(controls) - set(optional))
        if unknown:
            raise ClientError(f"the {signature} signature takes no {', '.join(unknown)}"
                              + (": add --beam N" if contract.LENGTH_PENALTY in unknown
                                 else ""), EXIT_USAGE)
        # Every control is sent, one per image: REST needs every input named, and a batching
        # server needs every input at the request's batch size (see serving/contract.py).
        full = {**inputs, **{name: np.full([len(data)], controls.get(name, default), dtype)
                             for name, (dtype, default) in optional.items()}}
        try:
            outputs = self._predict(signature, full, names)
        except ClientError as e:
            # An export from before the decoding controls: without any asked for, ask again
            # without them.
            if controls or not optional or not re.search(
                    r"Sent extra: \{\w|keys must be equal to|Inputs contains invalid name",
                    str(e)):
                raise
            outputs = self._predict(signature, inputs, names)
        return _results(outputs, len(data), beam)

    def model_card(self) -> dict:
        """The served version's model card (what `assets.extra/model_card.json` says): the
        commit, frameworks, data, backbone, settings, checkpoint and metrics behind it."""
        import numpy as np

        outputs = self._predict(contract.MODEL_CARD,
                                {contract.REQUEST: np.zeros([1], np.int32)}, [])
        return json.loads(_text(outputs[contract.MODEL_CARD][0]))

    def close(self) -> None:
        if self._channel is not None:
            self._channel.unsubscribe(self._watch)
            _wait_for_connectivity_threads(self._channel)
            self._channel.close()
            self._channel = self._stub = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _predict(self, signature: str, inputs: dict, names: list[str]) -> dict:
        """{output: array} of one Predict of `signature` with `inputs` ({name: array}, the batch
        first); `names` names the images in errors."""
        call = self._rest_predict if self.rest else self._grpc_predict
        return call(signature, inputs, names)

    # -- gRPC -------------------------------------------------------------------------------

    def _stub_for(self):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        if self._stub is None:
            options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                       ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
            if self.tls:
                read = lambda p: read_file(p, "certificate file") if p else None  # noqa: E731
                credentials = grpc.ssl_channel_credentials(
                    read(self.tls.ca_cert), read(self.tls.client_key),
                    read(self.tls.client_cert))
                self._channel = grpc.secure_channel(self.server, credentials, options)
            else:
                self._channel = grpc.insecure_channel(self.server, options)
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
            self._connected = self._refused = False
            self._channel.subscribe(self._watch)
        return self._stub

    def _watch(self, state) -> None:
        """Remembers whether the channel ever connected, or failed to."""
        import grpc

        if state == grpc.ChannelConnectivity.READY:
            self._connected = True
        elif state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            self._refused = True

    def _grpc_request(self, signature: str, inputs: dict):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature
        if self.version is not None:
            request.model_spec.version.value = self.version
        elif self.version_label:
            request.model_spec.version_label = self.version_label
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        if signature != contract.MODEL_CARD:
            request.output_filter.extend(OUTPUTS)
        return request

    def _grpc_predict(self, signature, inputs, names) -> dict:
        import grpc
        import tensorflow as tf

        request = self._grpc_request(signature, inputs)
        # --timeout is the server's: the clock starts once the request is built (importing
        # TensorFlow for it took over 3 s on a loaded machine, which left no time to connect).
        deadline = time.monotonic() + self.timeout
        delay, unavailable = 0.1, False
        while True:
            remaining = deadline - time.monotonic()
            try:
                response = self._stub_for().Predict(request, timeout=max(remaining, 0.001))
                return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if code == grpc.StatusCode.UNAVAILABLE:
                    unavailable = True
                    wait = min(delay * (1 + random.random()), deadline - time.monotonic())
                    if wait > 0:
                        time.sleep(wait)
                        delay = min(delay * 2, 2.0)
                        continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and (
                        unavailable or (self._refused and not self._connected)):
                    code = grpc.StatusCode.UNAVAILABLE  # it never connected: unreachable
                raise self._grpc_failure(code, details, names) from None

    def _grpc_failure(self, code, details: str, names: list[str]) -> ClientError:
        import grpc

        where = f"{self.server}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return ClientError(f"cannot reach the model server at {where} within "
                               f"{self.timeout:g}s ({_first_line(details)}): is it running? "
                               "check --server", EXIT_UNREACHABLE)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ClientError(f"no answer from {where} within {self.timeout:g}s: raise "
                               "--timeout or check the server's load", EXIT_DEADLINE)
        return self._failure(_grpc_to_http(code), details, names)

    # -- REST -------------------------------------------------------------------------------

    def _rest_url(self) -> str:
        url = f"{self.rest.rstrip('/')}/v1/models/{self.model_name}"
        if self.version is not None:
            url += f"/versions/{self.version}"
        elif self.version_label:
            url += f"/labels/{self.version_label}"
        return url + ":predict"

    def _ssl_context(self) -> ssl.SSLContext | None:
        """HTTPS settings for `--rest https://...`: the CA and client certificate of `tls`."""
        if not self.rest.startswith("https://"):
            return None
        if self._ssl is None:
            tls = self.tls or TLS()
            for path in (tls.ca_cert, tls.client_cert, tls.client_key):
                if path:
                    read_file(path, "certificate file")  # a missing file is one clear line
            try:
                self._ssl = ssl.create_default_context(cafile=tls.ca_cert)
                if tls.client_cert:
                    self._ssl.load_cert_chain(tls.client_cert, tls.client_key)
            except ssl.SSLError as e:
                raise ClientError(f"cannot use the TLS files ({e.reason}): check --ca_cert, "
                                  "--client_cert and --client_key", EXIT_USAGE) from None
        return self._ssl

    def _rest_predict(self, signature, inputs, names) -> dict:
        # TensorFlow Serving's row format: bytes as {"b64": ...}; a lone input's rows bare.
        columns = {name: [{"b64": base64.b64encode(v).decode()} if isinstance(v, bytes)
                          else v.item() for v in value] for name, value in inputs.items()}
        rows = [dict(zip(columns, row)) for row in zip(*columns.values())]
        if len(columns) == 1:
            rows = [next(iter(row.values())) for row in rows]
        payload = json.dumps({"signature_name": signature, "instances": rows}).encode()
        deadline = time.monotonic() + self.timeout
        delay, unreachable = 0.1, None  # the last connection failure, if any
        while True:
            remaining = deadline - time.monotonic()
            request = urllib.request.Request(self._rest_url(), payload,
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=max(remaining, 0.001),
                                            context=self._ssl_context()) as reply:
                    answer = json.loads(reply.read())
                break
            except urllib.error.HTTPError as e:
                try:
                    message = json.loads(e.read()).get("error", "")
                except ValueError:
                    message = e.reason
                if e.code == 503 and deadline - time.monotonic() > 0:
                    time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
                    delay = min(delay * 2, 2.0)
                    continue
                raise self._failure(e.code, message, names) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, ssl.SSLError):
                    raise ClientError(f"the TLS handshake with {self.rest} failed ({reason}): "
                                      "check --ca_cert, --client_cert and --client_key",
                                      EXIT_UNREACHABLE) from None
                timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
                if timed_out and unreachable is None:
                    raise ClientError(f"no answer from {self.rest} within {self.timeout:g}s: "
                                      "raise --timeout or check the server's load",
                                      EXIT_DEADLINE) from None
                # A deadline reached while retrying a refused or reset connection is
                # "unreachable", as for gRPC.
                unreachable = unreachable if timed_out else reason
                wait = min(delay * (1 + random.random()), deadline - time.monotonic())
                if wait > 0:
                    time.sleep(wait)
                    delay = min(delay * 2, 2.0)
                    continue
                raise ClientError(f"cannot reach the model server at {self.rest} within "
                                  f"{self.timeout:g}s ({unreachable}): is it running? check "
                                  "--rest", EXIT_UNREACHABLE) from None
        import numpy as np

        # TensorFlow Serving writes a lone output without its name.
        lone = contract.SIGNATURES.get(signature, contract.Signature({}, ("output",))).outputs[0]
        text = (contract.CAPTION, contract.MODEL_CARD)
        if "outputs" in answer:
            columns = answer["outputs"]
            columns = columns if isinstance(columns, dict) else {lone: columns}
            return {k: np.array(v, dtype=object if k in text else None)
                    for k, v in columns.items()}
        rows = answer["predictions"]
        rows = rows if isinstance(rows[0], dict) else [{lone: r} for r in rows]
        return {k: np.array([r[k] for r in rows], dtype=object if k in text else None)
                for k in rows[0]}

    # -- errors -----------------------------------------------------------------------------

    def _failure(self, http_status: int, details: str, names: list[str]) -> ClientError:
        message = _first_line(details)
        target = (f"model {self.model_name!r}"
                  + (f" version {self.version}" if self.version is not None else "")
                  + (f" label {self.version_label!r}" if self.version_label else ""))
        if (http_status == 404 or re.search(r"[Ss]ignature (key|name).* not found", message)
                or "Unrecognized servable version label" in message):
            return ClientError(f"{target} or its signature is not served by "
                               f"{self.rest or self.server}: {message}", EXIT_NOT_FOUND)
        if http_status == 400:
            message = name_the_image(message, names)
            return ClientError(f"the server rejected the request: {message}", EXIT_REJECTED)
        return ClientError(f"the server failed: {message}", EXIT_SERVER)


def _wait_for_connectivity_threads(channel, timeout: float = 2.0) -> None:
    """Waits until gRPC's connectivity threads have seen the last unsubscribe and stopped.

    The polling thread watches the channel in 0.2 s slices; a `close()` between its check for
    subscribers and its next watch makes it raise "Cannot monitor channel state: Channel
    closed!" from a daemon thread: a traceback on stderr (about 1 close in 300; once in CI).
    `_connectivity_state` is grpc's own (grpcio 1.x); without it there is nothing to wait for.
    """
    state = getattr(channel, "_connectivity_state", None)
    deadline = time.monotonic() + timeout
    while (state is not None and (state.polling or state.delivering)
           and time.monotonic() < deadline):
        time.sleep(0.01)


def name_the_image(message: str, names: list[str]) -> str:
    """The export's `image 3 of 8: ...` with the name of the request's fourth image. When the
    batch is not the request (the server's batching merged it with others), the index is into
    that merged batch: then the message says so instead of naming a wrong file."""
    found = re.search(r"image (\d+) of (\d+): (.*)", message)
    if not found:
        return message
    index, count, problem = int(found.group(1)), int(found.group(2)), found.group(3)
    if count == len(names):
        return f"{names[index]}: {problem}"
    return (f"image {index} of a batch of {count} that the server merged this request of "
            f"{len(names)} into: {problem} (that image may be another client's)")


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "no details"


def _grpc_to_http(code) -> int:
    import grpc

    return {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400,
            grpc.StatusCode.FAILED_PRECONDITION: 400,
            grpc.StatusCode.RESOURCE_EXHAUSTED: 400}.get(code, 500)


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _results(outputs: dict, count: int, beam: int) -> list[dict]:
    results = []
    for i in range(count):
        if beam:
            # A server-side batch runs at its widest width: keep the first `beam`.
            beams = [{"caption": _text(c), "log_prob": float(lp),
                      "tokens": [int(t) for t in tok[:int(n)]]}
                     for c, lp, tok, n in zip(outputs["caption"][i], outputs["log_prob"][i],
                                              outputs["tokens"][i], outputs["length"][i])][:beam]
            results.append({**beams[0], "beams": beams})
        else:
            n = int(outputs["length"][i])
            results.append({"caption": _text(outputs["caption"][i]),
                            "log_prob": float(outputs["log_prob"][i]),
                            "tokens": [int(t) for t in outputs["tokens"][i][:n]]})
    return results


def format_beams(path: str, beams: list[dict]) -> str:
    """An image's beams as printed by `serving.client` and `dist_caption.predict`: ranked."""
    return "\n".join([f"{path}:"] + [f"  {rank}. {b['caption']}  (log-prob {b['log_prob']:.2f})"
                                      for rank, b in enumerate(beams, 1)])
