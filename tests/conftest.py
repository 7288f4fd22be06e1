"""The shared test harness: tiny images, records and feature caches."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image(path: str, size=(20, 16), seed: int = 0, fmt: str = "JPEG") -> str:
    """A small random RGB image file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        path, format=fmt)
    return path


def tree_bytes(folder: str) -> dict[str, bytes]:
    """{path relative to `folder`: its bytes} for every file under `folder`."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def make_records(folder: str, counts=(("train", 6), ("val", 2), ("test", 2)), size=(20, 16)):
    """Records over freshly written JPEGs, 2-3 captions each."""
    from dist_caption.data.records import CaptionRecord

    os.makedirs(folder, exist_ok=True)
    records, n = [], 0
    for split, count in counts:
        for _ in range(count):
            path = write_image(os.path.join(folder, f"img{n:03d}.jpg"), size, seed=n)
            captions = (f"A photo number {n}.", f"picture {n} of a red circle",
                        "a blue square")[: 2 + n % 2]
            records.append(CaptionRecord(str(n), path, captions, split))
            n += 1
    return records


def run_module(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m module args` with this interpreter, from the repo root."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str,
                          status: int = 2) -> str:
    """Exit `status`, a single `error:` line on stderr naming `needles`, no traceback."""
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == status, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_training_errors(cases, tmp_path) -> None:
    """Runs `python -m dist_caption.train` for each (args, needle) of `cases` at once (each in
    its own model_dir under `tmp_path`): each must fail with one `error:` line naming needle."""
    procs = [subprocess.Popen([sys.executable, "-m", "dist_caption.train",
                               f"--model_dir={tmp_path / str(i)}", *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (args, _) in enumerate(cases)]
    for proc, (_, needle) in zip(procs, cases):
        out, err = proc.communicate(timeout=180)
        assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                              needle)


# The development lane (`launch/test.sh --fast`) leaves out the tests marked `slow`. A test that
# trains, exports or serves uses the tiny feature cache (directly, or through a fixture built on
# it), so using `tiny_cache` makes a test slow; the others that start TensorFlow processes or
# build real backbones are marked where they are written.
SLOW_FIXTURE = "tiny_cache"


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["local", "ram"])
def storage(request, tmp_path):
    """A folder on the local disk, or on TensorFlow's in-memory filesystem (`ram://`), which
    goes through the same tf.io.gfile layer as gs:// and s3://: a test taking it runs on both."""
    if request.param == "local":
        yield str(tmp_path / "storage")
        return
    import uuid

    import tensorflow as tf

    base = f"ram://bucket-{uuid.uuid4().hex[:8]}/storage"
    yield base
    if tf.io.gfile.exists(base):
        tf.io.gfile.rmtree(base)


@pytest.fixture
def records(tmp_path):
    return make_records(str(tmp_path / "images"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A 40-scene synthetic dataset and its `patches` cache: one train shard, 5 captions each.

    Returns (synthetic_dir, cache_dir); shared read-only by the tests that train.
    """
    from dist_caption.data import cache, sources
    from dist_caption.data.records import LoadReport

    root = tmp_path_factory.mktemp("tiny")
    synthetic_dir, cache_dir = str(root / "synthetic"), str(root / "cache")
    records = sources.synthetic_records(synthetic_dir, 40, 0, 64, LoadReport())
    cache.extract(records, cache_dir, cache.ExtractionSettings("synthetic", "patches", "none",
                                                               shard_size=64),
                  source={"synthetic_dir": synthetic_dir})
    return synthetic_dir, cache_dir


# Tiny and deterministic: 4 images (20 captions) per step, no dropout, fixed data order.
TINY = dict(units=16, num_heads=2, num_layers=1, max_len=24, global_batch_size=20,
            epochs=1, steps_per_epoch=3, warmup_steps=2, learning_rate=3e-3, dropout=0.0,
            eval_images=0, log_every=1, shuffle=False, patience=0,
            # The compiled step (the CPU default) is tested where it is the subject: the
            # default run, XLA vs plain losses, exact resume and the equal-weights test.
            xla="false")


TINY_FLAGS = [f"--{k}={v}" if not isinstance(v, bool) else f"--{'' if v else 'no'}{k}"
              for k, v in TINY.items()]


def tiny(cache_dir: str, model_dir: str, **overrides):
    """A `TrainConfig` of the TINY settings, with `overrides`."""
    from dist_caption import training

    return training.TrainConfig(cache_dir=cache_dir, model_dir=model_dir, **{**TINY, **overrides})


def weights_of(model_dir: str) -> list[np.ndarray]:
    """The model's weights in the run's latest checkpoint, restored the way users restore."""
    from dist_caption import run_dir

    model, _ = run_dir.restore(model_dir, "latest")
    return [w.numpy() for w in model.weights]


def _untrained_model(model_dir: str):
    """The run's captioner, built from its run.json, with no weights restored."""
    from dist_caption import run_dir
    from dist_caption.model.captioner import build_captioner

    return build_captioner(run_dir.model_config(run_dir.load(model_dir)))


def raw_weights_of(model_dir: str, checkpoint: str = "latest") -> list[np.ndarray]:
    """The model's own weights in a checkpoint, not their average (`--ema_decay`)."""
    import tensorflow as tf

    from dist_caption import run_dir

    model = _untrained_model(model_dir)
    tf.train.Checkpoint(model=model).restore(run_dir.checkpoint_path(model_dir, checkpoint)) \
        .expect_partial().assert_existing_objects_matched()
    return [w.numpy() for w in model.weights]


def averages_of(model_dir: str, checkpoint: str = "latest") -> list[np.ndarray]:
    """The averaged weights (`--ema_decay`) in a checkpoint, in the model's weight order."""
    from dist_caption import run_dir
    from dist_caption.model import averaging

    model = _untrained_model(model_dir)
    averaging.restore_into(model, run_dir.checkpoint_path(model_dir, checkpoint))
    return [w.numpy() for w in model.trainable_weights]


def losses_of(model_dir: str, tag: str = "train/loss") -> dict[int, float]:
    """step -> the `tag` scalar from the run's TensorBoard event files."""
    from dist_caption import training

    return training.logged_scalars(model_dir, tag)


@pytest.fixture(scope="session")
def tiny_run(tiny_cache, tmp_path_factory):
    """A run trained for a few steps on `tiny_cache`: (synthetic_dir, cache_dir, model_dir)."""
    from dist_caption import training

    synthetic_dir, cache_dir = tiny_cache
    model_dir = str(tmp_path_factory.mktemp("tiny_run") / "run")
    training.run(training.TrainConfig(cache_dir=cache_dir, model_dir=model_dir,
                                **{**TINY, "steps_per_epoch": 6}))
    return synthetic_dir, cache_dir, model_dir


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory):
    """`tiny_run` exported once (at most 8 images per request): the version folder's path."""
    from dist_caption import exporting

    return exporting.export(tiny_run[2], str(tmp_path_factory.mktemp("tiny_export") / "caption"),
                         max_batch=8)


# ------------------------------------------------------------------------------------ serving

TEST_IDS = ("37", "38", "39", "40")  # the test split of `tiny_cache`


def image_path(synthetic_dir: str, image_id: str) -> str:
    return os.path.join(synthetic_dir, "images", f"{int(image_id):09d}.jpg")


class LocalServer:
    """`python -m serving.local_server` in a subprocess, stopped on exit (`base` None: the
    model comes from a --model_config_file among `extra`)."""

    def __init__(self, base: str | None, tmp, *extra: str):
        from serving.local_server import process

        self.ready = str(tmp / f"ready-{time.monotonic_ns()}.json")
        self.log = open(str(tmp / "server.log"), "ab")
        try:
            self.process, ports = process.start(
                [*([f"--model_base_path={base}"] if base else []), "--port=0", "--rest_port=0",
                 "--poll_seconds=0.3", *extra], self.ready, log=self.log,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"})
        except process.DidNotStart as e:
            raise AssertionError(f"{e}: " + open(str(tmp / "server.log")).read()[-3000:])
        self.grpc = f"localhost:{ports['port']}"
        self.rest = f"http://localhost:{ports['rest_port']}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def model_base(export_path: str, parent) -> str:
    """A new model base path under `parent` holding version 1, a copy of `export_path`."""
    folder = parent / "caption"
    shutil.copytree(export_path, folder / "1")
    return str(folder)


def expected_captions(reference, paths: list[str]) -> list[str]:
    """The captions the in-process export `reference` (tf.saved_model.load's object, whose
    methods take the signatures' defaults) gives the image files `paths`."""
    import tensorflow as tf

    images = tf.constant([open(p, "rb").read() for p in paths])
    return [c.decode() for c in reference.serving_default(image_bytes=images)["caption"].numpy()]


def assert_bytes_and_cached_grids_caption_alike(exported: str, cache_dir: str, manifest: dict,
                                                 paths: list[str], loaded) -> dict:
    """An export of a backbone, on TensorFlow Serving's loading path (a Session): the image files
    `paths` through `serving_default` (bytes decoded, preprocessed and run through the
    backbone in-graph) caption as `loaded` (tf.saved_model.load of it) does, and as
    `caption_features` does their grids from the cache (same tokens and lengths, log-probs and
    attention within float16 rounding). Returns serving_default's outputs."""
    import tensorflow as tf
    from dist_caption.data import pipeline
    from serving.local_server import loading

    jpegs = np.array([open(p, "rb").read() for p in paths], dtype=object)
    cached = {}
    for split in manifest["splits"]:
        for batch in pipeline.image_dataset(cache_dir, split, batch_size=8):
            for path, grid in zip(batch["image_path"].numpy(), batch["features"].numpy()):
                cached[path.decode()] = grid
    features = np.stack([cached[p] for p in paths]).astype(np.float32)
    bundle = loading.SavedModelBundle(exported)
    try:
        served = bundle.run("serving_default", {"image_bytes": jpegs})
        from_cache = bundle.run("caption_features", {"features": features})
    finally:
        bundle.close()
    assert [c.decode() for c in served["caption"]] == expected_captions(loaded, paths)
    python = loaded.serving_default(image_bytes=tf.constant(jpegs))
    np.testing.assert_array_equal(served["tokens"], python["tokens"].numpy())
    np.testing.assert_array_equal(served["tokens"], from_cache["tokens"])
    np.testing.assert_array_equal(served["length"], from_cache["length"])
    np.testing.assert_allclose(served["log_prob"], from_cache["log_prob"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(served["attention"], from_cache["attention"], rtol=0, atol=1e-3)
    return served


def default_controls(signature: str, batch: int) -> dict:
    """Every optional input of `signature` at its default, one per image (as the client sends
    them: a batching server needs every input at the request's batch size)."""
    import numpy as np
    from serving import contract

    return {name: np.full([batch], default, dtype)
            for name, (dtype, default) in contract.optional_inputs(signature).items()}


def predict_grpc(server, signature: str, version: int | None = None,
                 output_filter: tuple[str, ...] = (), timeout: float = 60, **inputs):
    """A Predict call over gRPC (of `version`, else the newest; only `output_filter`'s outputs
    if given): (response, output name -> numpy)."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "caption"
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.output_filter.extend(output_filter)
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=timeout)
    return response, {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
