"""Reliability: faults, bad input and load. Each test asserts what a user relies on: the exit
status, the message, the steps trained, the files left intact, the requests that succeed."""

from __future__ import annotations

import errno
import glob
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import (ROOT, TINY, LocalServer, assert_one_line_error, image_path, model_base,
                      predict_grpc, run_module, tree_bytes)
from dist_caption import run_dir, training
from dist_caption.data import pipeline
from dist_caption.errors import UserError

# Its module fixtures are expensive: one xdist worker runs all its tests (launch/test.sh).
pytestmark = pytest.mark.xdist_group("reliability")

# ---------------------------------------------------------------------------------- training


def test_a_full_disk_at_checkpoint_time_is_one_clear_error_and_keeps_the_last_checkpoint(
        tiny_cache, tmp_path, monkeypatch):
    """The disk fills while the step-6 checkpoint is being written: its index and half of its
    data file are on disk when the write fails. The run stops with one clear error; the step-3
    checkpoint stays the latest and restores with its weights; a re-run resumes from it (its
    first save is step 6's) and leaves a sound step-6 checkpoint."""
    _, cache_dir = tiny_cache
    model_dir = str(tmp_path / "run")
    checkpoints = os.path.join(model_dir, "checkpoints")
    real_save = tf.train.CheckpointManager.save
    calls, weights = [], {}

    def save(self, *args, **kwargs):
        number = kwargs.get("checkpoint_number")
        calls.append(number)
        if len(calls) <= 2:  # step 3: latest and best written
            weights[number] = [v.numpy() for v in self._checkpoint.model.weights]
            return real_save(self, *args, **kwargs)
        # Step 6: the bytes start landing in the checkpoint folder, then the disk is full.
        prefix = os.path.join(self.directory, f"ckpt-{number}")
        self._checkpoint.write(prefix)
        (data,) = glob.glob(prefix + ".data-*")
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    config = training.TrainConfig(cache_dir=cache_dir, model_dir=model_dir,
                               **{**TINY, "epochs": 2})
    with pytest.raises(UserError, match=r"could not write the step-6 checkpoint in .* \(No space "
                                        r"left on device\): free space .*ckpt-3 is intact"):
        training.run(config)
    assert calls == [3, 3, 6]
    assert glob.glob(os.path.join(checkpoints, "ckpt-6.index")), "nothing of step 6 was written"
    assert tf.train.latest_checkpoint(checkpoints) == os.path.join(checkpoints, "ckpt-3")
    model, _ = run_dir.restore(model_dir, "latest")
    assert len(model.weights) == len(weights[3])
    for restored, saved in zip(model.weights, weights[3]):
        np.testing.assert_array_equal(restored.numpy(), saved)

    resumed = []

    def recording_save(self, *args, **kwargs):
        resumed.append(kwargs.get("checkpoint_number"))
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", recording_save)
    training.run(config)
    assert resumed and set(resumed) == {6}, f"the re-run saved steps {resumed}: not resumed at 3"
    final = tf.train.latest_checkpoint(checkpoints)
    assert final == os.path.join(checkpoints, "ckpt-6")
    assert tf.train.load_checkpoint(final).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 6
    run_dir.restore(model_dir, "latest")


def _serve_one(version_folder: str, image: bytes) -> dict:
    """serving_default of the SavedModel in `version_folder` on one image: output -> numpy."""
    served = tf.saved_model.load(version_folder)
    return {k: v.numpy() for k, v in served.serving_default(
        image_bytes=tf.constant([image])).items()}


def test_exporting_into_an_unwritable_place_is_one_clear_error(tiny_run, tiny_export, tmp_path):
    """A base folder that cannot be made is refused before any work. And when the base folder
    that already serves version 1 stops taking bytes mid-export (a file-size limit: what a full
    disk or quota does to a write, and unlike folder permissions it binds root too), the export
    is one `error:` line, and version 1 stays byte for byte what it was, still captions the
    same, and is the only folder there: no half-written version 2, no staging folder."""
    from dist_caption import exporting

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=re.escape(f"cannot write in {blocker / 'caption'} (Not "
                                                  "a directory): choose a writable "
                                                  "--export_base")):
        exporting.export(tiny_run[2], str(blocker / "caption"))

    base = model_base(tiny_export, tmp_path)
    first = os.path.join(base, "1")
    files_before = tree_bytes(first)
    image = open(image_path(tiny_run[0], "37"), "rb").read()
    captioned_before = _serve_one(first, image)
    limit = 64 << 10  # the SavedModel's variables, warm-up requests and graph are all larger
    result = subprocess.run(
        [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource."
         f"RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
         "os.execv(sys.executable, [sys.executable, '-m', 'dist_caption.export', "
         "*sys.argv[1:]])", f"--model_dir={tiny_run[2]}", f"--export_base={base}"],
        cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}, capture_output=True,
        text=True, timeout=300)
    assert_one_line_error(result, f"could not write the export under {base} (File too large)",
                          "every existing version is untouched")
    assert os.listdir(base) == ["1"], "a half-written export was left in the base folder"
    assert tree_bytes(first) == files_before, "the export changed version 1's files"
    captioned_after = _serve_one(first, image)
    assert captioned_after.keys() == captioned_before.keys()
    assert captioned_before["caption"][0]
    for name, value in captioned_before.items():
        np.testing.assert_array_equal(captioned_after[name], value, err_msg=name)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_cache_shard_is_named_before_training_and_rebuilt_alone(tiny_cache, tmp_path,
                                                                         damage):
    synthetic_dir, shared = tiny_cache
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(shared, cache_dir)
    manifest = pipeline.load_manifest(cache_dir)
    shard = os.path.join(cache_dir, manifest["splits"]["train"]["shards"][0]["file"])
    others = {f: os.stat(f).st_mtime_ns for f in glob.glob(os.path.join(cache_dir, "*.tfrecord"))
              if f != shard}
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:] if damage == "flipped byte"
                else data[:len(data) // 2])
    with pytest.raises(UserError, match=f"shard {shard} is corrupt"):
        training.run(training.TrainConfig(cache_dir=cache_dir, model_dir=str(tmp_path / "run"),
                                    **TINY))
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))
    result = run_module("dist_caption.extract_features", f"--synthetic_dir={synthetic_dir}",
                        f"--cache_dir={cache_dir}", "--num_images=40", "--image_size=64",
                        "--weights=none",
                        "--shard_size=64", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {f: os.stat(f).st_mtime_ns for f in others} == others, "a sound shard was rewritten"
    pipeline.split_files(cache_dir, pipeline.load_manifest(cache_dir), "train", verify=True)


# ----------------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def fresh_base(tiny_export, tmp_path_factory):
    return model_base(tiny_export, tmp_path_factory.mktemp("reliable"))


@pytest.fixture(scope="module")
def small_limit_server(fresh_base, tmp_path_factory):
    """A local server refusing messages above 2 MiB."""
    running = LocalServer(fresh_base, tmp_path_factory.mktemp("limits"), "--max_message_mb=2")
    yield running
    running.stop()


def _png(size, mode="L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


def _jpeg(seed=0) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), np.uint8)).save(
        out, "JPEG")
    return out.getvalue()


def _images(*items) -> np.ndarray:
    return np.array(list(items), dtype=object)


BAD_REQUESTS = {
    # name: (signature, model, version, inputs, status, message)
    "empty bytes": ("serving_default", "caption", None, {"image_bytes": _images(b"")},
                    "INVALID_ARGUMENT", "image 0 of 1: is empty"),
    "random bytes": ("serving_default", "caption", None,
                     {"image_bytes": _images(np.random.default_rng(1).bytes(500))},
                     "INVALID_ARGUMENT", "image 0 of 1: is not a JPEG, PNG, GIF or BMP image"),
    "truncated jpeg": ("serving_default", "caption", None,
                       {"image_bytes": _images(_jpeg(), _jpeg(2)[:700])},
                       "INVALID_ARGUMENT", "image 1 of 2: is truncated"),
    "png bomb": ("serving_default", "caption", None, {"image_bytes": _images(_png((8000, 6000)))},
                 "INVALID_ARGUMENT", "image 0 of 1: is 8000x6000 = 48000000 pixels, above the limit"),
    "wrong dtype": ("serving_default", "caption", None,
                    {"image_bytes": np.zeros([1], np.float32)},
                    "INVALID_ARGUMENT", "Expects arg[0] to be string but float is provided"),
    "wrong input name": ("serving_default", "caption", None, {"images": _images(_jpeg())},
                         "INVALID_ARGUMENT", "Signature input alias: image_bytes(feed name: "
                                             "serving_default_image_bytes:0) not found in "
                                             "request and no default value provided. Inputs "
                                             "expected to be in the request {images}"),
    # TF Serving >= 2.14 (predict_util.cc, then TensorFlow's GetInputValues): a signature with
    # defaults takes fewer inputs than it has, so an extra one is caught by name.
    "extra input": ("serving_default", "caption", None,
                    {"image_bytes": _images(_jpeg()), "images": _images(_jpeg())},
                    "INVALID_ARGUMENT", "Inputs contains invalid name. Used request inputs: "
                                        "image_bytes, request input: image_bytes,images"),
    "extra input, no defaults": ("sample", "caption", None,
                                 {"image_bytes": _images(_jpeg()), "images": _images(_jpeg()),
                                  "temperature": np.ones([1], np.float32),
                                  "seed": np.zeros([1], np.int64)},
                                 "INVALID_ARGUMENT", "input size does not match signature: 4!=3 "
                                 "len({image_bytes,images,seed,temperature}) != "
                                 "len({image_bytes,seed,temperature}). Sent extra: {images}. "
                                 "Missing but required: {}."),
    "missing input": ("beam_search", "caption", None, {"image_bytes": _images(_jpeg())},
                      "INVALID_ARGUMENT", "Signature input alias: beam_width(feed name: "
                      "beam_search_beam_width:0) not found in request and no default value "
                      "provided. Inputs expected to be in the request {image_bytes}, or default "
                      "input alias set: length_penalty,max_length,min_length,no_repeat_ngram,"
                      "repetition_penalty"),
    "unknown signature": ("captions_please", "caption", None, {"image_bytes": _images(_jpeg())},
                          "FAILED_PRECONDITION", 'Serving signature key "captions_please" not '
                                                 "found."),
    "unknown model": ("serving_default", "kittens", None, {"image_bytes": _images(_jpeg())},
                      "NOT_FOUND", "Servable not found for request: Latest(kittens)"),
    "unknown version": ("serving_default", "caption", 42, {"image_bytes": _images(_jpeg())},
                        "NOT_FOUND", "Servable not found for request: Specific(caption, 42)"),
    "batch above the limit": ("serving_default", "caption", None,
                              {"image_bytes": _images(*[_jpeg()] * 9)},
                              "INVALID_ARGUMENT", "the request holds 9 images; send between 1 "
                                                  "and 8 per request"),
    "oversized message": ("serving_default", "caption", None,
                          {"image_bytes": _images(b"\xff\xd8\xff" + bytes(3 << 20))},
                          "RESOURCE_EXHAUSTED", "Received message larger than max"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
@pytest.mark.setting("max_message_mb")
def test_each_bad_request_gets_its_status_and_message_and_the_server_keeps_serving(
        small_limit_server, case):
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    signature, model, version, inputs, status, message = BAD_REQUESTS[case]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(small_limit_server.grpc, options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(request, timeout=60)
    assert caught.value.code() == getattr(grpc.StatusCode, status), caught.value.details()
    assert message in caught.value.details()
    _, good = predict_grpc(small_limit_server, "serving_default", image_bytes=_images(_jpeg()))
    assert good["caption"].shape == (1,)


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_ten_thousand_requests_at_concurrency_32_without_error_or_memory_growth(
        fresh_base, tiny_run, tmp_path):
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    server = LocalServer(fresh_base, tmp_path, "--threads=32")
    try:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "caption"
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(
            _images(open(image_path(tiny_run[0], "37"), "rb").read())))
        channels = [grpc.insecure_channel(server.grpc) for _ in range(4)]
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels]
        errors, done, lock = [], [0], threading.Lock()
        rss_at_1000 = []

        def one(i: int) -> None:
            try:
                stubs[i % len(stubs)].Predict(request, timeout=60)
            except grpc.RpcError as e:
                errors.append(f"{e.code()}: {e.details()}")
            with lock:
                done[0] += 1
                if done[0] == 1000:
                    rss_at_1000.append(_rss_kib(server.process.pid))

        start = time.monotonic()
        with futures.ThreadPoolExecutor(32) as pool:
            list(pool.map(one, range(10_000)))
        elapsed = time.monotonic() - start
        rss_end = _rss_kib(server.process.pid)
        for c in channels:
            c.close()
    finally:
        server.stop()
    assert not errors, errors[:3]
    assert done[0] == 10_000
    assert rss_end <= 1.10 * rss_at_1000[0], (rss_at_1000[0], rss_end)
    print(f"10,000 requests in {elapsed:.1f}s ({10_000 / elapsed:.0f}/s), RSS "
          f"{rss_at_1000[0] // 1024} -> {rss_end // 1024} MiB")


@pytest.mark.alone
def test_client_deadline_with_a_slow_server():
    """A stand-in PredictionService that answers after 5 s (the same gRPC protocol)."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from serving.client import EXIT_DEADLINE, CaptionClient, ClientError

    class SlowPredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            time.sleep(5)
            context.abort(grpc.StatusCode.INTERNAL, "too late")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        SlowPredictionService(), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        start = time.monotonic()
        with pytest.raises(ClientError, match="no answer from .* within 1s") as caught:
            CaptionClient(f"localhost:{port}", timeout=1).caption([_jpeg()])
        assert caught.value.exit_code == EXIT_DEADLINE
        assert time.monotonic() - start < 3
    finally:
        server.stop(0)


def test_a_closed_client_leaves_no_grpc_thread_to_fail_at_exit(monkeypatch):
    """gRPC's connectivity thread polls the channel in 0.2 s slices; a client closing the
    channel under it made that daemon thread raise "Channel closed!" (a traceback on stderr at
    exit, about 1 close in 300). Against a stand-in PredictionService answering NOT_FOUND (the
    same gRPC protocol): when the client closes its channel, gRPC's polling has stopped (the
    race cannot happen; grpc's own `_connectivity_state`), and no thread raises."""
    import grpc
    import grpc._channel
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from serving.client import EXIT_NOT_FOUND, CaptionClient, ClientError

    class NoSuchVersion(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, "Servable not found: Specific(caption, 7)")

    raised, polling_at_close = [], []
    hook, threading.excepthook = threading.excepthook, raised.append
    close = grpc._channel.Channel.close

    def recording_close(channel):
        polling_at_close.append(channel._connectivity_state.polling)
        close(channel)

    monkeypatch.setattr(grpc._channel.Channel, "close", recording_close)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(NoSuchVersion(), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        for _ in range(10):
            with CaptionClient(f"localhost:{port}", version=7, timeout=10) as client:
                with pytest.raises(ClientError) as caught:
                    client.caption([_jpeg()])
            assert caught.value.exit_code == EXIT_NOT_FOUND
        time.sleep(0.5)
    finally:
        threading.excepthook = hook
        server.stop(0)
    assert polling_at_close == [False] * 10, polling_at_close
    assert not raised, [repr(r.exc_value) for r in raised]


@pytest.mark.slow
@pytest.mark.setting("port")
def test_client_retries_while_the_server_restarts(fresh_base, tiny_run, tmp_path):
    """One client across a restart of its server on the same port: it is answered; the server
    is killed and nothing answers (a call without retries is UNAVAILABLE at once, the client
    with a deadline shorter than the outage is "unreachable"); a call it makes during the
    outage is retried until the restarted server answers it, with the same caption."""
    import grpc

    from serving.client import EXIT_UNREACHABLE, CaptionClient, ClientError

    image = image_path(tiny_run[0], "37")
    one = _images(open(image, "rb").read())
    first = LocalServer(fresh_base, tmp_path)
    second = None
    client = CaptionClient(first.grpc, timeout=120)
    try:
        before = client.caption([image])
        assert before[0]["caption"]
        first.process.kill()  # no goodbye: connections drop, the port closes
        first.process.wait(timeout=30)
        first.log.close()
        with pytest.raises(grpc.RpcError) as down:
            predict_grpc(first, "serving_default", image_bytes=one)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        with CaptionClient(first.grpc, timeout=1) as impatient:
            with pytest.raises(ClientError, match="cannot reach the model server") as caught:
                impatient.caption([image])
        assert caught.value.exit_code == EXIT_UNREACHABLE

        results, errors = [], []

        def call():
            try:
                results.append((client.caption([image]), time.monotonic()))
            except ClientError as e:
                errors.append(e)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(1)  # the call is under way, and is refused, before a server is back
        assert caller.is_alive() and not errors, errors
        port = first.grpc.rsplit(":", 1)[1]
        second = LocalServer(fresh_base, tmp_path, f"--port={port}")  # overrides --port=0
        back = time.monotonic()
        assert second.grpc == first.grpc
        caller.join(timeout=150)
        assert not caller.is_alive(), "the call did not end within its deadline"
        assert not errors, str(errors[0])
        (during, answered), = results
        assert answered >= back - 1, "answered before the restarted server was ready"
        assert during[0]["caption"] == before[0]["caption"]
        assert during[0]["tokens"] == before[0]["tokens"]
        assert client.caption([image])[0]["caption"] == before[0]["caption"]
    finally:
        client.close()
        if first.process.poll() is None:
            first.stop()
        if second is not None:
            second.stop()
