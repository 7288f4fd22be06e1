"""Loading a SavedModel the way TensorFlow Serving does, and the versions of one model.

`SavedModelBundle` follows TensorFlow's `LoadSavedModel` (tensorflow/cc/saved_model/loader.cc),
which TensorFlow Serving's SavedModelBundleFactory calls: the MetaGraphDef tagged `serve` is
imported into a new Session, the saver's restore op is run on `variables/variables`, then the
init op (`__saved_model_init_op`: tables, assets); signatures are run by their SignatureDef
tensor names. That is also `saved_model_cli run`'s path. Unlike `tf.saved_model.load`, it
restores only what the MetaGraph's saver covers, so a variable the saver misses fails here as it
fails on the real server.

`ModelManager` follows tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc
(integer folder names are versions, the newest N are served) and the availability-preserving
policy of tensorflow_serving/core/aspired_versions_manager.cc (a new version is loaded and warmed
up before an old one is unloaded; a version that fails to load leaves the old one serving).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import threading
from typing import Callable

import grpc
import tensorflow as tf
from absl import logging
from tensorflow.python.util import deprecation

from serving.local_server import signatures
from serving.local_server.batching import Batcher
from serving.local_server.signatures import ServingError

SERVE_TAG = "serve"
# tensorflow_serving/servables/tensorflow/saved_model_warmup_util.cc
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000


def version_folders(base_path: str, complete: bool = True) -> list[int]:
    """The versions under a model base path, as TensorFlow Serving sees them: integer folder
    names (holding a saved_model.pb, unless `complete` is False), sorted; so `.tmp-3-x`,
    being written, is none."""
    if not tf.io.gfile.isdir(base_path):  # tf.io.gfile: the base path may be gs://...
        return []
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(base_path)]
    return sorted(int(n) for n in names if n.isdigit() and (
        not complete or tf.io.gfile.exists(os.path.join(base_path, n, "saved_model.pb"))))


def disable_xla_compilation() -> None:
    """What TensorFlow Serving's main() does unless --xla_{cpu,gpu}_compilation_enabled: calls
    TensorFlow's own `tensorflow::DisableXlaCompilation()`, after which every XLA compilation in
    this process fails with INTERNAL "XLA compilation disabled"."""
    library = ctypes.CDLL(os.path.join(os.path.dirname(tf.__file__), "libtensorflow_cc.so.2"))
    library._ZN10tensorflow21DisableXlaCompilationEv()


class SavedModelBundle:
    """A SavedModel in a TF1 Session: load, restore, init op, run by SignatureDef names.

    >>> bundle = SavedModelBundle("exports/caption/1")                    # doctest: +SKIP
    >>> bundle.run("serving_default", {"image_bytes": np.array([jpeg], object)})  # doctest: +SKIP
    {'caption': array([b'a red circle above a blue square'], dtype=object), ...}
    """

    def __init__(self, path: str, tags: tuple[str, ...] = (SERVE_TAG,)):
        self.path = path
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        try:
            # TF Serving's loader, on purpose: its deprecation notice points at the other path.
            with deprecation.silence():
                meta_graph = tf.compat.v1.saved_model.loader.load(self.session, list(tags), path)
        except BaseException:
            self.session.close()
            raise
        # `__saved_model_init_op` and the like are not callable signatures.
        self.signature_defs = {name: sig for name, sig in meta_graph.signature_def.items()
                               if not name.startswith("__")}

    def run(self, signature: str, feeds: dict, output_filter=()) -> dict:
        """Runs a signature on checked feeds (input alias -> numpy); output alias -> numpy."""
        sig = self.signature_defs[signature]
        fetches = {alias: info.name for alias, info in sig.outputs.items()
                   if not output_filter or alias in output_filter}
        try:
            return self.session.run(fetches, {sig.inputs[alias].name: value
                                              for alias, value in feeds.items()})
        except tf.errors.OpError as e:
            raise signatures.from_tf_error(e) from None

    def close(self) -> None:
        self.session.close()


def warmup_requests(path: str) -> list:
    """The PredictionLog records of `assets.extra/tf_serving_warmup_requests` (none: [])."""
    from tensorflow_serving.apis import prediction_log_pb2

    warmup = os.path.join(path, WARMUP_FILE)
    if not os.path.isfile(warmup):
        return []
    logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(warmup)]
    if len(logs) > MAX_WARMUP_RECORDS:
        raise ValueError(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) "
                         f"at {warmup}")
    return logs


def replay_warmup(predict: Callable[[str, dict], dict], path: str) -> int:
    """Runs every warm-up record through `predict(signature, inputs)`, as TensorFlow Serving
    does before a version takes traffic; the first failure fails the load. Returns the count."""
    logs = warmup_requests(path)
    for log in logs:
        if log.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"unsupported warm-up log type {log.WhichOneof('log_type')!r} in "
                             f"{os.path.join(path, WARMUP_FILE)}: only predict_log is replayed")
        request = log.predict_log.request
        predict(request.model_spec.signature_name,
                {k: tf.make_ndarray(v) for k, v in request.inputs.items()})
    return len(logs)


@dataclasses.dataclass
class Servable:
    """One loaded version: its bundle and, with batching, one Batcher per signature."""
    version: int
    bundle: SavedModelBundle
    batchers: dict = dataclasses.field(default_factory=dict)

    @property
    def signature_defs(self) -> dict:
        return self.bundle.signature_defs

    def predict(self, signature: str, inputs: dict, output_filter=(), rest: bool = False) -> dict:
        """Checks `inputs` against the signature and runs it (batched when enabled)."""
        signature = signature or signatures.DEFAULT_SIGNATURE
        sig = signatures.find(self.signature_defs, signature, rest)
        feeds = signatures.check_inputs(sig, inputs, output_filter)
        batcher = self.batchers.get(signature)
        if batcher:
            outputs = batcher.submit(feeds)
            return {k: v for k, v in outputs.items() if not output_filter or k in output_filter}
        return self.bundle.run(signature, feeds, output_filter)

    def retire(self) -> None:
        """Stops taking batches once the queued ones ran. The Session closes when the last
        request still running on this version lets go of it (Session.__del__)."""
        for batcher in self.batchers.values():
            batcher.close()

    def close(self) -> None:
        self.retire()
        self.bundle.close()


class ModelManager:
    """The loaded versions of one model; `poll` loads new ones and retires old ones."""

    def __init__(self, name: str, base_path: str, num_versions: int = 1,
                 labels: dict[str, int] | None = None, batching: dict | None = None,
                 versions: tuple[int, ...] | None = None):
        """`batching`: None, or Batcher settings {max_batch_size, timeout, threads[,
        allowed_batch_sizes]}. `versions`: TF Serving's `specific` policy (these versions,
        when on disk) instead of the newest `num_versions`."""
        self.name = name
        self.base_path = base_path
        self.num_versions = num_versions
        self.versions = versions
        self.labels = labels or {}
        self.batching = batching
        self._missing_warned: set[int] = set()
        self._lock = threading.Lock()
        self._served: dict[int, Servable] = {}
        # version -> (state, error code, error message); the code is a grpc.StatusCode.
        self._states: dict[int, tuple[str, grpc.StatusCode, str]] = {}

    def versions_on_disk(self) -> list[int]:
        return version_folders(self.base_path)

    def wanted_versions(self) -> list[int]:
        """The versions the policy aspires to: the newest `num_versions`, or the `specific`
        ones found on disk (a missing one is warned about once, as TF Serving warns)."""
        on_disk = self.versions_on_disk()
        if self.versions is None:
            return on_disk[-self.num_versions:]
        for version in set(self.versions) - set(on_disk) - self._missing_warned:
            logging.warning("Version %d of servable %s, which was requested to be served as a "
                            "'specific' version in the servable's version policy, was not "
                            "found in the file system", version, self.name)
            self._missing_warned.add(version)
        return sorted(set(self.versions) & set(on_disk))

    def poll(self) -> None:
        """Loads the newest versions not loaded yet, then drops the ones no longer wanted."""
        wanted = self.wanted_versions()
        for version in wanted:
            if version in self._served or self._states.get(version, ("",))[0] == "END":
                # As TensorFlow Serving: a version that failed is not retried on later polls.
                continue
            self._load(version)
        with self._lock:
            keep = set(wanted) if any(v in self._served for v in wanted) else set(self._served)
            for version in [v for v in self._served if v not in keep]:
                # In-flight requests hold their own reference and finish on the old version.
                self._served.pop(version).retire()
                self._states[version] = ("END", grpc.StatusCode.OK, "")
                logging.info("unloaded %s version %d", self.name, version)

    def _load(self, version: int) -> None:
        path = os.path.join(self.base_path, str(version))
        with self._lock:
            self._states[version] = ("LOADING", grpc.StatusCode.OK, "")
        servable = None
        try:
            servable = Servable(version, SavedModelBundle(path))
            if self.batching:
                for signature in servable.signature_defs:
                    servable.batchers[signature] = Batcher(
                        functools.partial(servable.bundle.run, signature), **self.batching)
            count = replay_warmup(servable.predict, path)
        except Exception as e:  # a broken version must not take the server down
            code, message = load_failure(path, e)
            logging.error("%s version %d cannot be loaded: %s", self.name, version, message)
            if servable is not None:
                servable.close()
            with self._lock:
                self._states[version] = ("END", code, message)
            return
        with self._lock:
            self._served[version] = servable
            self._states[version] = ("AVAILABLE", grpc.StatusCode.OK, "")
        logging.info("serving %s version %d from %s (%d warm-up requests replayed)",
                     self.name, version, path, count)

    def resolve(self, model_spec) -> Servable:
        """The servable a request's ModelSpec names, or ServingError(NOT_FOUND...)."""
        if model_spec.name != self.name:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Latest({model_spec.name})")
        choice = model_spec.WhichOneof("version_choice")
        with self._lock:
            if choice == "version_label":
                label = model_spec.version_label
                if label not in self.labels:
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Unrecognized servable version label: {label}")
            if choice in ("version", "version_label"):
                version = (model_spec.version.value if choice == "version"
                           else self.labels[model_spec.version_label])
                if version not in self._served:
                    raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for "
                                       f"request: Specific({self.name}, {version})")
                return self._served[version]
            if not self._served:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: Latest({self.name})")
            return self._served[max(self._served)]

    def available(self) -> list[int]:
        with self._lock:
            return sorted(self._served)

    def status(self, version: int | None = None) -> list[tuple[int, str, grpc.StatusCode, str]]:
        """(version, state, error code, error message) for every version seen (or the one asked
        for), newest first; an unloaded version stays listed as END with OK."""
        with self._lock:
            states = dict(self._states)
        if version is not None:
            if version not in states:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version "
                                   f"{version} of model {self.name}")
            states = {version: states[version]}
        return [(v, *states[v]) for v in sorted(states, reverse=True)]

    def close(self) -> None:
        with self._lock:
            for servable in self._served.values():
                servable.close()
            self._served.clear()


def read_model_config(path: str) -> dict:
    """`ModelManager` keyword arguments from a TensorFlow Serving `--model_config_file` (a text
    ModelServerConfig holding one model): name, base_path, version policy (latest, all or
    specific) and version_labels. Raises ValueError naming the file and the problem."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    try:
        with open(path, encoding="utf-8") as f:
            config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    except OSError as e:
        raise ValueError(f"cannot read --model_config_file {path}: {e.strerror}") from None
    except text_format.ParseError as e:
        raise ValueError(f"--model_config_file {path} is not a ModelServerConfig text proto: "
                         f"{e}") from None
    models = config.model_config_list.config
    if len(models) != 1:
        raise ValueError(f"--model_config_file {path} lists {len(models)} models: the local "
                         "server serves one; keep one config in model_config_list")
    model = models[0]
    if model.model_platform not in ("", "tensorflow"):
        raise ValueError(f"--model_config_file {path}: model_platform "
                         f"{model.model_platform!r} is not served here; use \"tensorflow\"")
    policy = model.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    settings = {"name": model.name, "base_path": model.base_path,
                "labels": dict(model.version_labels)}
    if choice == "specific":
        settings["versions"] = tuple(sorted(policy.specific.versions))
    elif choice == "all":
        settings["num_versions"] = 2 ** 62
    else:  # latest, TensorFlow Serving's default: max(num_versions, 1)
        settings["num_versions"] = max(policy.latest.num_versions, 1)
    return settings


def load_failure(path: str, error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a failed load is reported with: TensorFlow Serving passes the loader's or the
    warm-up request's own error on unchanged (here with the path, on one line)."""
    if isinstance(error, ServingError):
        return error.code, f"warm-up request failed: {error.message} ({path})"
    if isinstance(error, tf.errors.OpError):
        return (signatures.from_tf_error(error).code,
                f"{signatures.clean_tf_message(error.message)} ({path})")
    if isinstance(error, (OSError, ValueError)):  # e.g. no saved_model.pb, a bad warm-up file
        return grpc.StatusCode.INVALID_ARGUMENT, f"{error} ({path})"
    return grpc.StatusCode.UNKNOWN, f"{error} ({path})"
