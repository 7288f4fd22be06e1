"""Exporting a trained run as a versioned SavedModel that captions image bytes in-graph.

`export(model_dir, export_base)` (the command: `python -m dist_caption.export`, export.py)
writes `exports/caption/<version>/` (the next integer unless `--version`), the layout TensorFlow
Serving watches. The folder is written under a hidden temporary name, loaded back and run once,
and only then renamed into place, so a server never sees half a model.

The signatures, their inputs and their outputs are the serving contract (`serving/contract.py`):
`serving_default` (image bytes -> greedy caption, tokens, length, log-prob, attention),
`caption_features` (a feature grid -> the same), `beam_search` (image bytes, beam width -> K
captions best first) and `sample` (image bytes, temperature, seed). `serving_default` and
`beam_search` also take the optional decoding controls (`check_controls`, `decoding.constrain`)
whose defaults the SignatureDefs record. Every export is checked against the contract before it
is published, and records it in its metadata.

Every input has the batch as its first dimension, because TensorFlow Serving's
`--enable_batching` merges concurrent requests along it and refuses scalar inputs. A beam search
batch runs at its widest `beam_width` (K = the maximum), so each image gets K beams, best first;
send one width for the whole request (the client does) and read the first K. Each sampled
caption depends only on its own image, temperature and seed, not on its batch-mates.

Image decoding and checks (`data/images.py`), the backbone rebuilt from the feature cache's own
weights, the captioner (built by `build_captioner`, the training path), KV-cached decoding and
the vocabulary all live in the graph; nothing is read from the training folders at serving time.
`--export_xla` compiles the greedy decoder of `serving_default` and `caption_features` with XLA;
TensorFlow Serving then needs `--xla_cpu_compilation_enabled=true` (CPU) or
`--xla_gpu_compilation_enabled=true` (GPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from dist_caption import run_dir
from dist_caption.data import cache, images, pipeline, text
from dist_caption.errors import UserError
from dist_caption import config, files, provenance
from dist_caption.files import write_json_atomic
from dist_caption.model import decoding
from dist_caption.tracing import traced
from serving import DEFAULT_MODEL_NAME, contract, publish
from serving.local_server import loading
from serving.local_server.loading import WARMUP_FILE, version_folders

SIGNATURES = tuple(contract.SIGNATURES)  # serving/contract.py: names, inputs, outputs
METADATA_FILE = os.path.join("assets.extra", "dist_caption.json")
MODEL_CARD_FILE = contract.MODEL_CARD_FILE
# The allowed_batch_sizes of k8s/serving/components/xla-batching/batching.config (a test keeps
# them equal): every merged batch the server runs has one of these sizes.
DEFAULT_WARMUP_BATCH_SIZES = config.WARMUP_BATCH_SIZES


def _spec(name: str) -> tf.TensorSpec:
    """A signature input of the contract: [B] of its dtype."""
    return tf.TensorSpec([None], tf.dtypes.as_dtype(_INPUT_DTYPES[name]), name=name)


def _default(name: str) -> tf.Tensor:
    """An optional input's default, one value (SignatureDef `defaults`)."""
    return tf.constant([contract.DEFAULTS[name]], _spec(name).dtype)


_INPUT_DTYPES = {k: v for s in contract.SIGNATURES.values() for k, v in s.inputs.items()}
CONTROL_SPECS = [_spec(name) for name in contract.CONTROLS]


def per_image(controls: dict, count) -> dict:
    """Each control (one value, or one per image: `check_controls` has checked) as [count]."""
    return {name: tf.broadcast_to(value, [count]) for name, value in controls.items()}


def check_controls(controls: dict, count, max_len: int) -> list:
    """Assert ops for the decoding controls of a request of `count` images: each holds one
    value or one per image, in its range; a bad one fails the request with INVALID_ARGUMENT and
    a message naming it and its range."""
    checks = []

    def require(name: str, ok, rule: str) -> None:
        value = controls[name]
        size = tf.size(value)
        checks.append(tf.debugging.Assert(
            tf.logical_and(tf.logical_or(size == 1, size == count), tf.reduce_all(ok)),
            [tf.strings.format(f"{name} is {{}}; send one value or one per image, {rule}",
                               value, summarize=8)]))

    words = f"between 0 and {max_len} words (the model limit)"
    if contract.MAX_LENGTH in controls:
        length = controls[contract.MAX_LENGTH]
        require(contract.MAX_LENGTH, (length >= 0) & (length <= max_len),
                f"{words}; 0: the model limit")
        shortest = controls[contract.MIN_LENGTH]
        require(contract.MIN_LENGTH, (shortest >= 0) & (shortest <= max_len) & (
            (length == 0) | (shortest <= length)), f"{words}, and at most max_length")
        require(contract.NO_REPEAT_NGRAM, (controls[contract.NO_REPEAT_NGRAM] >= 0)
                & (controls[contract.NO_REPEAT_NGRAM] <= max_len),
                f"the n-gram size to block, {words}; 0: off, 3: no repeated trigram")
        penalty = controls[contract.REPETITION_PENALTY]
        require(contract.REPETITION_PENALTY, tf.math.is_finite(penalty) & (penalty >= 1.0),
                "at least 1; 1: off, below 1 would favour repeated words")
    if contract.LENGTH_PENALTY in controls:
        penalty = controls[contract.LENGTH_PENALTY]
        require(contract.LENGTH_PENALTY, tf.math.is_finite(penalty) & (penalty >= 0.0),
                "at least 0; 0: rank beams by summed log-probability")
    return checks


def build_module(model, backbone, vocab, *, image_size: int, max_pixels: int, max_batch: int,
                 max_beam: int, xla: bool, model_card: dict):
    """The exported `tf.Module`: every signature as a traced method, everything tracked;
    `model_card` (JSON-able) is what the `model_card` signature answers."""
    card = json.dumps(model_card, sort_keys=True)
    rows, cols, channels = model.config.feature_shape
    max_len = model.config.max_len

    class CaptionModule(tf.Module):
        def __init__(self):
            super().__init__(name="caption")
            # TensorFlow Serving restores variables with the MetaGraph's saver, which covers
            # only objects of the object graph. A Keras 3 layer puts its KerasVariable there,
            # not the backing tf.Variable the traced functions read (tensorflow/serving#2250):
            # so the module holds the backing variables themselves, and not the layers (which
            # would save every weight twice). The layers are reached through the closures.
            self.model_variables = [v.value for v in model.variables]
            self.backbone_variables = [v.value for v in backbone.variables]
            self.tokenizer = text.TokenizerModule(vocab)
            self.vocab_table = self.tokenizer.table  # tracked, so it is exported
            # The words by id, for tools that label tokens (predict's attention maps).
            self.vocabulary = tf.Variable(vocab.tokens, trainable=False, name="vocabulary")
            self._greedy = traced(
                lambda f, c: decoding.greedy_decode(model, f, max_len, c), jit_compile=xla)

        # Traced once, and called by every signature that takes image bytes: the backbone's
        # graph is written once in the SavedModel, not once per signature.
        @traced(input_signature=[_spec(contract.IMAGE_BYTES)])
        def features(self, image_bytes):
            pixels = images.decode_batch(image_bytes, image_size, max_pixels, max_batch)
            grid = backbone(pixels, training=False)
            # The cache stores float16 grids: round the same way, so served captions are the
            # captions of the cached features.
            return tf.cast(tf.cast(grid, tf.float16), tf.float32)

        def outputs(self, decoded):
            out = {contract.CAPTION: self.tokenizer.detokenize(decoded["tokens"]),
                   contract.TOKENS: decoded["tokens"], contract.LENGTH: decoded["length"],
                   contract.LOG_PROB: decoded["log_prob"]}
            if "attention" in decoded:
                out[contract.ATTENTION] = decoded["attention"]
            return out

        @traced(input_signature=[_spec(contract.IMAGE_BYTES), *CONTROL_SPECS])
        def serving_default(self, image_bytes, max_length=_default(contract.MAX_LENGTH),
                            min_length=_default(contract.MIN_LENGTH),
                            no_repeat_ngram=_default(contract.NO_REPEAT_NGRAM),
                            repetition_penalty=_default(contract.REPETITION_PENALTY)):
            controls = {contract.MAX_LENGTH: max_length, contract.MIN_LENGTH: min_length,
                        contract.NO_REPEAT_NGRAM: no_repeat_ngram,
                        contract.REPETITION_PENALTY: repetition_penalty}
            count = tf.size(image_bytes)
            with tf.control_dependencies(check_controls(controls, count, max_len)):
                features = self.features(image_bytes)
                controls = per_image(controls, count)
            return self.outputs(self._greedy(features, controls))

        @traced(input_signature=[
            tf.TensorSpec([None, rows, cols, channels], tf.float32, name=contract.FEATURES)])
        def caption_features(self, features):
            count = tf.shape(features)[0]
            ok = tf.debugging.Assert(
                tf.logical_and(count > 0, count <= max_batch),
                [tf.strings.format("the request holds {} feature grids; send between 1 and "
                                   + str(max_batch) + " per request", count)])
            with tf.control_dependencies([ok]):
                neutral = {name: _default(name) for name in contract.CONTROLS}
                return self.outputs(self._greedy(tf.identity(features),
                                                 per_image(neutral, count)))

        @traced(input_signature=[
            _spec(contract.IMAGE_BYTES), _spec(contract.BEAM_WIDTH), *CONTROL_SPECS,
            _spec(contract.LENGTH_PENALTY)])
        def beam_search(self, image_bytes, beam_width,
                        max_length=_default(contract.MAX_LENGTH),
                        min_length=_default(contract.MIN_LENGTH),
                        no_repeat_ngram=_default(contract.NO_REPEAT_NGRAM),
                        repetition_penalty=_default(contract.REPETITION_PENALTY),
                        length_penalty=_default(contract.LENGTH_PENALTY)):
            controls = {contract.MAX_LENGTH: max_length, contract.MIN_LENGTH: min_length,
                        contract.NO_REPEAT_NGRAM: no_repeat_ngram,
                        contract.REPETITION_PENALTY: repetition_penalty,
                        contract.LENGTH_PENALTY: length_penalty}
            count = tf.size(image_bytes)
            ok = tf.debugging.Assert(
                tf.logical_and(tf.size(beam_width) == count, tf.reduce_all(
                    tf.logical_and(beam_width >= 1, beam_width <= max_beam))),
                [tf.strings.format("beam_width is {}; it must hold one width between 1 and "
                                   + str(max_beam) + " per image", beam_width)])
            with tf.control_dependencies([ok, *check_controls(controls, count, max_len)]):
                features = self.features(image_bytes)
                controls = per_image(controls, count)
            # One search per batch, at its widest width (see the module docstring).
            decoded = decoding.beam_search_decode(
                model, features, max_len, tf.reduce_max(beam_width),
                controls.pop(contract.LENGTH_PENALTY), controls)
            batch, width = tf.shape(decoded["tokens"])[0], tf.shape(decoded["tokens"])[1]
            flat = tf.reshape(decoded["tokens"], [-1, max_len])
            captions = tf.reshape(self.tokenizer.detokenize(flat), [batch, width])
            return {contract.CAPTION: captions, contract.TOKENS: decoded["tokens"],
                    contract.LENGTH: decoded["length"], contract.LOG_PROB: decoded["log_prob"]}

        @traced(input_signature=[
            tf.TensorSpec([None], tf.string, name=contract.IMAGE_BYTES),
            tf.TensorSpec([None], tf.float32, name=contract.TEMPERATURE),
            tf.TensorSpec([None], tf.int64, name=contract.SEED)])
        def sample(self, image_bytes, temperature, seed):
            count = tf.size(image_bytes)
            ok = tf.debugging.Assert(
                tf.logical_and(tf.logical_and(tf.size(temperature) == count,
                                              tf.size(seed) == count),
                               tf.reduce_all(temperature > 0)),
                [tf.strings.format("temperature is {} and seed {}; send one of each per image, "
                                   "temperatures above 0 (serving_default gives greedy "
                                   "captions)", (temperature, seed))])
            with tf.control_dependencies([ok]):
                features = self.features(image_bytes)
            decoded = decoding.sample_decode(model, features, max_len, temperature, seed)
            del decoded["attention"]
            return self.outputs(decoded)

        @traced(input_signature=[
            tf.TensorSpec([None], tf.int32, name=contract.REQUEST)])
        def model_card(self, request):
            return {contract.MODEL_CARD: tf.fill(tf.shape(request), card)}

    return CaptionModule()


def save(module, path: str) -> None:
    """`tf.saved_model.save` of a `build_module` result with the documented signatures."""

    # The tf.functions themselves (not concrete functions): their tensor default arguments
    # become the SignatureDefs' `defaults`, which TensorFlow Serving fills in.
    tf.saved_model.save(module, path, signatures={
        name: getattr(module, name) for name in SIGNATURES})


def warmup_image() -> bytes:
    """A small JPEG (a colour gradient) for warm-up requests and the export's self-check."""

    ramp = tf.linspace(0.0, 255.0, 64)
    rgb = tf.stack([ramp[None, :] + 0 * ramp[:, None], ramp[:, None] + 0 * ramp[None, :],
                    255.0 - ramp[None, :] + 0 * ramp[:, None]], axis=-1)
    return tf.io.encode_jpeg(tf.cast(rgb, tf.uint8)).numpy()


def warmup_requests(model_name: str, max_batch: int, feature_shape,
                    batch_sizes: tuple[int, ...] = DEFAULT_WARMUP_BATCH_SIZES,
                    xla: bool = False) -> list:
    """PredictionLog records TensorFlow Serving replays before a version takes traffic: every
    signature once, serving_default at each of `batch_sizes` up to `max_batch` and, for an XLA
    export, caption_features at those sizes too: XLA compiles once per shape, and with the
    serving overlay's `allowed_batch_sizes` (the same list) merged batches only take these."""
    image = warmup_image()

    def request(signature: str, **inputs) -> prediction_log_pb2.PredictionLog:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = model_name
        req.model_spec.signature_name = signature
        for name, value in inputs.items():
            req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        return prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=req))

    def images(batch: int) -> np.ndarray:
        return np.array([image] * batch, dtype=object)

    def controls(signature: str, batch: int) -> dict:
        # Every optional input at the batch size: a batching server needs all of them so.
        return {name: np.full([batch], default, dtype)
                for name, (dtype, default) in contract.optional_inputs(signature).items()}

    sizes = sorted({1, *(b for b in batch_sizes if b <= max_batch)})
    logs = [request("serving_default", image_bytes=images(b), **controls("serving_default", b))
            for b in sizes]
    logs += [request("caption_features", features=np.zeros([b, *feature_shape], np.float32))
             for b in (sizes if xla else [1])]
    logs.append(request("beam_search", image_bytes=images(1),
                        beam_width=np.array([3], np.int32), **controls("beam_search", 1)))
    logs.append(request("sample", image_bytes=images(1), temperature=np.array([1.0], np.float32),
                        seed=np.array([0], np.int64)))
    logs.append(request("model_card", request=np.array([0], np.int32)))
    return logs


def write_warmup(path: str, logs: list) -> None:
    """Writes `logs` as `<path>/assets.extra/tf_serving_warmup_requests` (a TFRecord file)."""
    os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(path, WARMUP_FILE)) as writer:
        for log in logs:
            writer.write(log.SerializeToString())


def next_version(export_base: str) -> int:
    """1 + the highest integer version folder in `export_base` (1 when there is none)."""
    return max(version_folders(export_base, complete=False), default=0) + 1


def export(model_dir: str, export_base: str, *, checkpoint: str = "best",
           cache_dir: str | None = None, version: int | None = None, xla: bool = False,
           max_pixels: int | None = None, max_batch: int | None = None, max_beam: int = config.MAX_BEAM,
           model_name: str = DEFAULT_MODEL_NAME,
           warmup_batch_sizes: tuple[int, ...] = DEFAULT_WARMUP_BATCH_SIZES) -> str:
    """Writes `<export_base>/<version>/` atomically and returns its path.

    A local `export_base`: the version is written in `<export_base>/.tmp-<v>-xxx/` (not an
    integer, so TensorFlow Serving ignores it) and renamed to `<v>` in one rename(2). An object
    store (gs://, s3://, ram://): there is no rename, so the version is written in a local
    temporary folder, checked, then published by `serving.publish.publish_object_store`:
    uploaded under a temporary prefix, then copied into `<v>/` with saved_model.pb last.
    """
    max_pixels = max_pixels or images.MAX_PIXELS
    max_batch = max_batch or images.MAX_BATCH
    version = version or next_version(export_base)
    remote = files.is_remote(export_base)
    final = os.path.join(export_base, str(version))
    if files.exists(final):
        raise UserError(f"{final} already exists: versions are never overwritten; pass another "
                        "--version or leave it out to take the next free one")
    try:  # checked before any work
        if remote:
            files.writable_folder(export_base, "export_base")
        else:
            os.makedirs(export_base, exist_ok=True)
            tempfile.TemporaryFile(dir=export_base).close()
    except OSError as e:
        raise UserError(f"cannot write in {export_base} ({e.strerror}): choose a writable "
                        "--export_base") from None
    model, run = run_dir.restore(model_dir, checkpoint)
    if run.get("zero_features"):
        raise UserError(f"{model_dir} was trained with --zero_features (an image-blind "
                        "baseline): there is nothing to export")
    cache_dir = cache_dir or run["cache_dir"]
    manifest = pipeline.load_manifest(cache_dir)
    pipeline.check_compatible(manifest, {"feature_shape": run["model"]["feature_shape"],
                                         "vocab_sha256": run["vocab_sha256"],
                                         "backbone": run["backbone"]}, cache_dir)
    vocab = run_dir.vocabulary(model_dir)
    backbone = cache.load_backbone(cache_dir, manifest["backbone"])
    card = model_card(model_dir, run, manifest, run_dir.checkpoint_path(model_dir, checkpoint),
                      model_name=model_name, version=version,
                      export_settings={"xla": xla, "max_image_pixels": max_pixels,
                                       "max_batch": max_batch, "max_beam": max_beam})
    module = build_module(model, backbone, vocab, image_size=manifest["input_size"],
                          max_pixels=max_pixels, max_batch=max_batch, max_beam=max_beam,
                          xla=xla, model_card=card)

    try:
        # Not a number, so TensorFlow Serving ignores it while it is being written.
        staging = tempfile.mkdtemp(prefix=f".tmp-{version}-",
                                   dir=None if remote else export_base)
    except OSError as e:
        raise UserError(f"cannot write in {export_base} ({e.strerror}): choose a writable "
                        "--export_base") from None
    try:
        with _quiet_tensorflow():
            save(module, staging)
        write_warmup(staging, warmup_requests(model_name, max_batch,
                                              run["model"]["feature_shape"],
                                              warmup_batch_sizes, xla))
        metadata = {
            "signatures": list(SIGNATURES), "contract": contract.as_json(),
            "model": run["model"], "backbone": run["backbone"],
            "image_size": manifest["input_size"], "max_image_pixels": max_pixels,
            "max_batch": max_batch, "max_beam": max_beam, "xla": xla,
            "dataset": run["dataset"], "model_dir": files.absolute(model_dir),
            "checkpoint": checkpoint, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                   time.gmtime())}
        write_json_atomic(os.path.join(staging, METADATA_FILE), metadata)
        write_json_atomic(os.path.join(staging, MODEL_CARD_FILE), card)
        with _quiet_tensorflow():
            _self_check(staging)
        if remote:
            publish.publish_object_store(staging, export_base, version)
            shutil.rmtree(staging)
        else:
            os.chmod(staging, 0o755)  # mkdtemp makes it private; a server may run as another
            os.rename(staging, final)  # user
    except publish.PublishError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(str(e)) from None
    except (OSError, tf.errors.OpError) as e:  # TensorFlow's own writes raise OpError
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"could not write the export under {export_base} ({_reason(e)}); "
                        "every existing version is untouched: free space or choose another "
                        "--export_base") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def model_card(model_dir: str, run: dict, manifest: dict, checkpoint_path: str, *,
               model_name: str, version: int, export_settings: dict) -> dict:
    """What a served version is (`assets.extra/model_card.json`, and the `model_card`
    signature): the code that trained and exported it (git commit, dirty tree), TensorFlow and
    Keras, the dataset and the cache's records fingerprint, the backbone and its weights, every
    setting, the checkpoint and its step, and the metrics `evaluate` wrote into the run."""
    step = os.path.basename(checkpoint_path).rpartition("-")[2]
    return {
        "model": {"name": model_name, "version": version, "signatures": list(SIGNATURES),
                  "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "code": {"training": run.get("code"), "export": provenance.code_version()},
        "frameworks": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "data": {"dataset": manifest["dataset"], "records_sha256": manifest["records_sha256"],
                 "cache_dir": run["cache_dir"], "vocab_sha256": run["vocab_sha256"]},
        "backbone": {"name": manifest["backbone"], "weights": manifest["weights"],
                     "image_size": manifest["input_size"],
                     "feature_shape": run["model"]["feature_shape"],
                     "feature_dtype": manifest["feature_dtype"],
                     # a keras_hub backbone's preset (its path, encoder, size and patches) and
                     # what became of its class token (--class_token)
                     **{k: manifest[k] for k in ("preset", "class_token") if k in manifest}},
        "settings": {"model": run["model"], "training": run["train"],
                     "export": export_settings},
        "checkpoint": {"path": files.absolute(checkpoint_path),
                       "step": int(step) if step.isdigit() else None,
                       "averaged_weights": run_dir.averaged(run)},  # --ema_decay
        "metrics": _evaluations(model_dir),
    }


def _evaluations(model_dir: str) -> dict:
    """{split: metrics, images, decoding, checkpoint, computed_at} of each `eval-<split>.json`
    that `python -m dist_caption.evaluate` wrote into the run (none: {})."""
    found = {}
    for split, path in run_dir.eval_files(model_dir).items():
        evaluation = files.read_json(path)
        mtime = tf.io.gfile.stat(path).mtime_nsec / 1e9
        found[evaluation.get("split", split)] = {
            **{k: evaluation.get(k) for k in ("metrics", "images", "decoding", "checkpoint")},
            "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))}
    return found


def _reason(error: Exception) -> str:
    """Why a write failed, in a few words: an OSError's strerror, or the end of TensorFlow's
    message ("{{function_node ...}} <file>; File too large [Op:SaveV2]": "File too large")."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    lines = (getattr(error, "message", "") or str(error)).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    if line.endswith("]") and " [Op:" in line:
        line = line[:line.rindex(" [Op:")]
    return line.rsplit("; ", 1)[-1]


@contextlib.contextmanager
def _quiet_tensorflow():
    """TensorFlow's SavedModel writer and loader log at INFO (through absl and its own logger)
    every renamed capture, checkpoint shard and restore: noise for a user, so only warnings
    while they run."""
    verbosity, level = logging.get_verbosity(), tf.get_logger().level
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("WARNING")
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        tf.get_logger().setLevel(level)


def contract_mismatches(signature_defs: dict) -> list[str]:
    """What in `signature_defs` (a MetaGraph's SignatureDefs by name) differs from the serving
    contract; empty if it follows it."""
    return contract.mismatches({
        name: ({k: tf.dtypes.as_dtype(v.dtype).name for k, v in sig.inputs.items()},
               tuple(sig.outputs),
               {k: tf.make_ndarray(v).reshape(-1)[0].item() for k, v in sig.defaults.items()})
        for name, sig in signature_defs.items()})


def _self_check(path: str) -> None:
    """Loads the written SavedModel the way TensorFlow Serving does (a Session: restore op, init
    op, SignatureDef tensor names) and replays every warm-up request through it, as the server
    does before a version takes traffic: an export the server would refuse is never published."""

    servable = loading.Servable(0, loading.SavedModelBundle(path))
    problems = contract_mismatches(servable.signature_defs)
    if problems:
        servable.close()
        raise RuntimeError(f"the export at {path} does not follow the serving contract "
                           f"(serving/contract.py): {'; '.join(problems)}")
    try:
        count = loading.replay_warmup(servable.predict, path)
        out = servable.predict("serving_default",
                               {"image_bytes": np.array([warmup_image()], dtype=object)})
        served_card = servable.predict(contract.MODEL_CARD, {
            contract.REQUEST: np.array([0], np.int32)})[contract.MODEL_CARD]
    except loading.ServingError as e:
        raise RuntimeError(f"the export at {path} fails on TensorFlow Serving's loading path: "
                           f"{e.message}") from None
    finally:
        servable.close()
    with open(os.path.join(path, MODEL_CARD_FILE)) as f:
        if json.loads(served_card[0]) != json.load(f):
            raise RuntimeError(f"the export at {path} serves a model card that differs from "
                               f"its {MODEL_CARD_FILE}")
    if out["caption"].shape != (1,) or count < len(SIGNATURES):
        raise RuntimeError(f"the export at {path} returned captions of shape "
                           f"{out['caption'].shape} for one image, after {count} warm-up "
                           "requests")
