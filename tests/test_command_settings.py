"""The commands' flags, run as a user runs them: each flag given a value other than its default
changes what the command does (what it reads, writes, refuses or serves), so a flag a command
ignored would fail here. tests/test_settings.py checks that every flag has such a test.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import (ROOT, TEST_IDS, LocalServer, assert_one_line_error, image_path,
                      model_base, predict_grpc)
from dist_caption import evaluation, exporting, run_dir
from dist_caption.data import pipeline, synthetic

# Its module fixtures (an export, a server) are expensive: one xdist worker runs all its tests.
pytestmark = pytest.mark.xdist_group("command_settings")


def start(module: str, *args: str, **env: str) -> subprocess.Popen:
    """`python -m module args`, started: several run at once, each paying TensorFlow's import."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(proc.args[2:])} still running after {timeout} s: "
                             f"{err[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------- extraction

@pytest.mark.slow
@pytest.mark.setting("synthetic_seed", "image_size", "backbone", "weights", "vocab_size",
                     "feature_dtype", "min_count", "overwrite", "extract_wait_timeout")
def test_extract_features_follows_its_flags(tmp_path):
    from dist_caption.data import backbones, cache, text

    donor = backbones.build_backbone("mobilenet_v3_small", "none")
    weights = str(tmp_path / "mnv3.weights.h5")
    donor.layers[-1].save_weights(weights)
    synthetic_dir, cache_dir = str(tmp_path / "synthetic"), str(tmp_path / "cache")
    data = [f"--synthetic_dir={synthetic_dir}", "--num_images=12", "--synthetic_seed=3",
            "--image_size=48", f"--cache_dir={cache_dir}", "--shard_size=4"]
    first = start("dist_caption.extract_features", *data, "--backbone=mobilenet_v3_small",
                  f"--weights={weights}", "--vocab_size=12", "--feature_dtype=float32",
                  "--extract_batch_size=4")
    # Task 1 of 2 waits for task 0 to generate the synthetic data: 1 s, not an hour.
    waiting = start("dist_caption.extract_features", f"--synthetic_dir={tmp_path / 'none'}",
                    f"--cache_dir={tmp_path / 'other'}", "--task_index=1", "--num_tasks=2",
                    "--extract_wait_timeout=1")
    succeeded(finish(first))
    assert_one_line_error(finish(waiting, timeout=120), "no complete synthetic dataset in",
                          "after 1 s")

    assert synthetic.settings(synthetic_dir) == {"num_images": 12, "seed": 3, "image_size": 48}
    with Image.open(os.path.join(synthetic_dir, "images", "000000001.jpg")) as picture:
        assert picture.size == (48, 48)
    manifest = pipeline.load_manifest(cache_dir)
    assert manifest["feature_shape"] == [7, 7, 576]  # mobilenet_v3_small's grid, not patches'
    assert manifest["feature_dtype"] == "float32"
    assert manifest["vocab_size_actual"] == 12
    batch = next(iter(pipeline.image_dataset(cache_dir, "train", 2)))
    assert batch["features"].dtype == tf.float32
    for got, want in zip(cache.load_backbone(cache_dir, "mobilenet_v3_small").weights,
                         donor.weights):  # the weights file's, not ImageNet's
        np.testing.assert_array_equal(got.numpy(), want.numpy())

    # Other settings need --overwrite; --min_count 3 leaves the words seen once or twice out.
    again = succeeded(finish(start("dist_caption.extract_features", *data, "--overwrite",
                                   "--min_count=3")))
    assert "grid [8, 8, 432] float16" in again.stdout
    manifest = pipeline.load_manifest(cache_dir)
    counts = manifest["train_token_counts"]
    vocab = text.Vocabulary.load(os.path.join(cache_dir, cache.VOCAB))
    words = range(len(text.SPECIALS), len(vocab.tokens))
    assert min(counts[i] for i in words) >= 3
    assert counts[text.UNK_ID] > 0  # the rarer words became [UNK]


# ------------------------------------------------------------------------ evaluate and report

@pytest.mark.slow
@pytest.mark.setting("split", "evaluate:limit", "evaluate:beam", "evaluate:length_penalty",
                     "checkpoint", "evaluate:cache_dir", "evaluate:no_repeat_ngram")
def test_evaluate_follows_its_flags(tiny_run, tmp_path):
    _, cache_dir, model_dir = tiny_run
    out, empty, missing = tmp_path / "val.json", tmp_path / "empty", tmp_path / "ckpt-3"
    empty.mkdir()
    run = ["dist_caption.evaluate", f"--model_dir={model_dir}"]
    procs = [start(*run, "--split=val", "--limit=2", "--beam=4", "--length_penalty=2",
                   "--no_repeat_ngram=1", "--checkpoint=latest", f"--out={out}"),
             start(*run, f"--cache_dir={empty}"),
             start(*run, f"--checkpoint={missing}")]
    done, no_cache, no_checkpoint = (finish(p) for p in procs)
    succeeded(done)
    latest = tf.train.latest_checkpoint(run_dir.checkpoints_dir(model_dir))
    assert f"restored {latest}\n" in done.stderr  # not best/ckpt-N
    report = json.loads(out.read_text())
    assert report["split"] == "val" and report["images"] == 2
    assert report["decoding"] == {"beam": 4, "length_penalty": 2.0, "no_repeat_ngram": 1}
    model, described = run_dir.restore(model_dir, "latest")
    max_len = described["model"]["max_len"]

    def captions(**decoding):
        return evaluation.caption_split(model, cache_dir, "val", max_len, limit=2, **decoding)[0]

    wanted = captions(beam=4, length_penalty=2.0, no_repeat_ngram=1)
    assert {k: v["prediction"] for k, v in report["captions"].items()} == wanted
    for caption in wanted.values():  # no word twice
        assert len(set(caption.split())) == len(caption.split()), caption
    # What the run gives without the beam, the length penalty or the blocking is another
    # caption.
    assert captions(beam=4, length_penalty=2.0) != wanted
    assert captions(no_repeat_ngram=1) != wanted
    assert captions(beam=4, no_repeat_ngram=1) != wanted
    assert_one_line_error(no_cache, f"no finished feature cache in {empty}")
    assert_one_line_error(no_checkpoint, f"--checkpoint {missing} is not a checkpoint")


@pytest.mark.setting("report:limit", "report:out", "split", "saved_model")
def test_report_follows_its_flags(tiny_run, tiny_export, tmp_path):
    synthetic_dir = tiny_run[0]
    out = tmp_path / "page.html"
    succeeded(finish(start("dist_caption.report", f"--synthetic_dir={synthetic_dir}",
                           "--num_images=40", "--image_size=64", f"--saved_model={tiny_export}",
                           "--split=val", "--limit=2", f"--out={out}")))
    page = out.read_text()
    assert f"{tiny_export}: val split, 2 images" in page
    assert page.count("<tr><td data-v=") == 2
    val = sorted(i.decode() for b in pipeline.image_dataset(tiny_run[1], "val", 8)
                 for i in b["image_id"].numpy())
    assert f"<br>{val[0]}</td>" in page and f"<br>{val[1]}</td>" in page


# ---------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def flagged_export(tiny_run, tmp_path_factory):
    """`python -m dist_caption.export` with every export flag set: (the version's path, the
    command's result), and the result of an export told to read an empty --cache_dir."""
    model_dir = tiny_run[2]
    base = str(tmp_path_factory.mktemp("flagged") / "caption")
    empty = tmp_path_factory.mktemp("empty_cache")
    procs = [start("dist_caption.export", f"--model_dir={model_dir}", f"--export_base={base}",
                   "--checkpoint=latest", "--version=7", "--export_xla",
                   "--max_image_pixels=5000", "--max_batch=4", "--max_beam=3",
                   "--model_name=pictures", "--warmup_batch_sizes=2,3"),
             start("dist_caption.export", f"--model_dir={model_dir}",
                   f"--export_base={base}-2", f"--cache_dir={empty}")]
    done, no_cache = (finish(p, timeout=600) for p in procs)
    return os.path.join(base, "7"), succeeded(done), (no_cache, str(empty))


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.setting("export:version", "export_xla", "max_image_pixels", "max_batch",
                     "max_beam", "export:model_name", "warmup_batch_sizes", "export:cache_dir",
                     "checkpoint")
def test_export_follows_its_flags(flagged_export, tiny_run):
    from serving.local_server import loading

    path, result, (no_cache, empty) = flagged_export
    assert os.path.isdir(path) and f"exported {path}" in result.stdout  # --version 7
    latest = tf.train.latest_checkpoint(run_dir.checkpoints_dir(tiny_run[2]))
    assert f"restored {latest}\n" in result.stderr
    assert_one_line_error(no_cache, f"no finished feature cache in {empty}")
    metadata = json.load(open(os.path.join(path, exporting.METADATA_FILE)))
    assert metadata["xla"] is True
    requests = [log.predict_log.request for log in loading.warmup_requests(path)]
    assert {r.model_spec.name for r in requests} == {"pictures"}
    assert sorted(r.inputs["image_bytes"].tensor_shape.dim[0].size for r in requests
                  if r.model_spec.signature_name == "serving_default") == [1, 2, 3]
    loaded = tf.saved_model.load(path)  # its methods take the defaults
    small = jpeg(60, 40)  # 2,400 pixels
    with pytest.raises(tf.errors.InvalidArgumentError, match="send between 1 and 4"):
        loaded.serving_default(image_bytes=tf.constant([small] * 5))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="image 0 of 1: is 100x60 = 6000 pixels, above the limit of 5000"):
        loaded.serving_default(image_bytes=tf.constant([jpeg(100, 60)]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one width between 1 and 3"):
        loaded.beam_search(image_bytes=tf.constant([small]), beam_width=tf.constant([4]))
    assert loaded.beam_search(image_bytes=tf.constant([small]),
                              beam_width=tf.constant([3]))["caption"].shape == [1, 3]


@pytest.mark.slow
@pytest.mark.setting("xla_gpu_compilation_enabled")
def test_xla_gpu_compilation_enabled_also_serves_an_xla_export(flagged_export, tiny_run,
                                                               tmp_path):
    """As tensorflow_model_server: either XLA flag allows an --export_xla model (without
    one the server fails to start, test_serving_loading.py)."""
    path = flagged_export[0]
    base = tmp_path / "caption"
    shutil.copytree(path, base / "1")
    server = LocalServer(str(base), tmp_path, "--xla_gpu_compilation_enabled")
    try:
        image = open(image_path(tiny_run[0], TEST_IDS[0]), "rb").read()
        _, out = predict_grpc(server, "serving_default",
                              image_bytes=np.array([image], dtype=object))
        assert out["caption"].shape == (1,)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- serving

@pytest.fixture(scope="module")
def named_server(tiny_export, tmp_path_factory):
    """A local server of versions 1, 2 and 3 as `pictures`, the newest 2, on a given port,
    looking for new versions once an hour."""
    tmp = tmp_path_factory.mktemp("named")
    base = model_base(tiny_export, tmp)
    for version in ("2", "3"):
        shutil.copytree(os.path.join(base, "1"), os.path.join(base, version))
    port = free_port()
    running = LocalServer(base, tmp, "--model_name=pictures", "--num_versions=2",
                          f"--port={port}", "--poll_seconds=3600")
    yield running, base, port
    running.stop()


def model_status(server, name: str) -> dict[int, str]:
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    with grpc.insecure_channel(server.grpc) as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            request, timeout=30)
    return {s.version: get_model_status_pb2.ModelVersionStatus.State.Name(s.state)
            for s in response.model_version_status}


@pytest.mark.setting("local_server:model_name", "num_versions", "port")
def test_the_local_server_serves_the_newest_num_versions_under_model_name_on_port(
        named_server):
    import grpc

    server, _, port = named_server
    assert server.grpc == f"localhost:{port}"
    assert {v: s for v, s in model_status(server, "pictures").items()
            if s == "AVAILABLE"} == {2: "AVAILABLE", 3: "AVAILABLE"}
    image = np.array([exporting.warmup_image()], dtype=object)
    response, _ = predict_grpc_named(server, "pictures", image)
    assert response.model_spec.version.value == 3
    with pytest.raises(grpc.RpcError) as caught:
        predict_grpc_named(server, "caption", image)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def predict_grpc_named(server, name: str, images: np.ndarray):
    """A serving_default Predict call for the model `name`: (response, outputs)."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images))
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=60)
    return response, {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


@pytest.mark.setting("tls", "client:model_name")
def test_the_client_speaks_tls_only_with_tls(named_server, tiny_run):
    from serving.client import EXIT_UNREACHABLE

    server = named_server[0]
    image = image_path(tiny_run[0], TEST_IDS[0])
    args = [f"--server={server.grpc}", "--model_name=pictures", image]
    procs = [start("serving.client", *args, *extra)
             for extra in (["--timeout=60"], ["--timeout=5", "--tls"])]
    plain, tls = (finish(p) for p in procs)
    assert succeeded(plain).stdout.startswith(f"{image}: ")
    assert_one_line_error(tls, "cannot reach the model server", status=EXIT_UNREACHABLE)


@pytest.mark.setting("poll_seconds")
def test_a_new_version_waits_for_the_next_poll(named_server):
    """Polling once an hour: version 4, published after the start, is not even seen 4 s later
    (the default, every second, would have started loading it)."""
    server, base, _ = named_server
    staging = os.path.join(base, ".incoming")
    shutil.copytree(os.path.join(base, "1"), staging)
    os.rename(staging, os.path.join(base, "4"))  # as dist_caption.export publishes
    time.sleep(4)
    assert 4 not in model_status(server, "pictures")
