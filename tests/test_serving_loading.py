"""Models loaded the way TensorFlow Serving loads them: the local server's Session-based
SavedModelBundle is as strict as the real server (variables the saver misses, XLA without its
flag, a broken version, labels on unavailable versions), and the server's own life cycle around
it (a failed load reported with its reason while the old version serves on)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import (ROOT, TEST_IDS, LocalServer, assert_one_line_error, expected_captions,
                      image_path, predict_grpc)
from dist_caption import exporting
from serving.local_server import loading
from serving.local_server.signatures import ServingError


def keras_module_saved_plainly(path: str, warmup: bool = True) -> str:
    """A SavedModel of a plain `tf.Module` holding a Keras 3 layer, saved with
    `tf.saved_model.save`: what our export did before, and what tensorflow/serving#2250
    reports. `tf.saved_model.load` runs it; TensorFlow Serving cannot."""
    layer = keras.layers.Dense(3)
    layer.build((None, 4))

    class Plain(tf.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": self.layer(x)}

    module = Plain()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    if warmup:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.signature_name = "serving_default"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones([1, 4], np.float32)))
        os.makedirs(os.path.join(path, "assets.extra"))
        with tf.io.TFRecordWriter(os.path.join(path, loading.WARMUP_FILE)) as writer:
            writer.write(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
    return path


def test_the_session_path_refuses_what_only_tf_saved_model_load_runs(tmp_path):
    path = keras_module_saved_plainly(str(tmp_path / "plain"), warmup=False)
    x = np.ones([2, 4], np.float32)
    assert tf.saved_model.load(path).signatures["serving_default"](x=x)["y"].shape == (2, 3)
    bundle = loading.SavedModelBundle(path)
    with pytest.raises(ServingError) as caught:
        bundle.run("serving_default", {"x": x})
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "Could not find variable" in caught.value.message


def test_xla_is_disabled_the_way_tensorflow_serving_disables_it():
    script = ("import tensorflow as tf\n"
              "from serving.local_server import loading\n"
              "f = tf.function(lambda x: x * 2, jit_compile=True)\n"
              "assert f(tf.constant(1.0)) == 2.0\n"
              "loading.disable_xla_compilation()\n"
              "g = tf.function(lambda x: x * 3, jit_compile=True)\n"
              "try:\n"
              "    g(tf.constant(1.0))\n"
              "except tf.errors.InternalError as e:\n"
              "    print('refused:', e.message)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: XLA compilation disabled" in result.stdout


def _status(server) -> dict[int, tuple[str, str, str]]:
    """version -> (state, error code, error message), from the REST status endpoint."""
    with urllib.request.urlopen(f"{server.rest}/v1/models/caption", timeout=30) as reply:
        body = json.loads(reply.read())
    return {int(s["version"]): (s["state"], s["status"]["error_code"],
                                s["status"]["error_message"])
            for s in body["model_version_status"]}


def _wait_for_state(server, version: int, state: str, timeout: float = 120) -> tuple:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _status(server).get(version)
        if found and found[0] == state:
            return found
        time.sleep(0.3)
    raise AssertionError(f"version {version} never reached {state}: {_status(server)}")


@pytest.mark.slow
def test_a_version_that_cannot_load_is_reported_and_the_old_one_keeps_serving(
        tiny_export, tiny_run, tmp_path):
    base = tmp_path / "caption"
    shutil.copytree(tiny_export, base / "1")
    server = LocalServer(str(base), tmp_path)
    try:
        images = np.array([open(image_path(tiny_run[0], TEST_IDS[0]), "rb").read()], object)
        _, before = predict_grpc(server, "serving_default", image_bytes=images)

        # Version 2: its variables file is damaged, so the saver's restore op fails.
        shutil.copytree(tiny_export, tmp_path / "staging")
        data = next((tmp_path / "staging" / "variables").glob("variables.data-*"))
        data.write_bytes(data.read_bytes()[:100])
        os.rename(tmp_path / "staging", base / "2")
        state, code, message = _wait_for_state(server, 2, "END")
        assert code != "OK" and str(base / "2") in message, message

        # Version 3: Keras layers saved the way our export used to be: the restore op misses
        # their variables, so the first warm-up request fails, and with it the load.
        os.rename(keras_module_saved_plainly(str(tmp_path / "plain")), base / "3")
        state, code, message = _wait_for_state(server, 3, "END")
        assert code == "FAILED_PRECONDITION", (code, message)
        assert message.startswith("warm-up request failed: Could not find variable"), message

        response, after = predict_grpc(server, "serving_default", image_bytes=images)
        assert response.model_spec.version.value == 1
        np.testing.assert_array_equal(after["tokens"], before["tokens"])
        assert _status(server)[1][:2] == ("AVAILABLE", "OK")
    finally:
        server.stop()


def _start(base: str, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.local_server", f"--model_base_path={base}", "--port=0",
         *flags], cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"})


@pytest.mark.slow
@pytest.mark.setting("xla_cpu_compilation_enabled")
def test_an_xla_export_is_served_only_with_xla_compilation_enabled(tiny_run, tiny_export,
                                                                   tmp_path):
    base = str(tmp_path / "caption")
    exporting.export(tiny_run[2], base, xla=True, max_batch=8)
    refused = _start(base, tmp_path)
    assert_one_line_error(refused, "Failed to start server", "XLA compilation disabled",
                          "version 1", status=1)
    server = LocalServer(base, tmp_path, "--xla_cpu_compilation_enabled")
    try:
        paths = [image_path(tiny_run[0], i) for i in TEST_IDS]
        images = np.array([open(p, "rb").read() for p in paths], object)
        _, out = predict_grpc(server, "serving_default", image_bytes=images)
        reference = tf.saved_model.load(tiny_export)
        assert [c.decode() for c in out["caption"]] == expected_captions(reference, paths)
    finally:
        server.stop()


@pytest.mark.setting("version_labels")
def test_startup_fails_like_tensorflow_serving(tiny_export, tmp_path):
    base = tmp_path / "caption"
    shutil.copytree(tiny_export, base / "1")
    label = _start(str(base), tmp_path, "--version_labels=stable=1,canary=2")
    assert_one_line_error(label, "Failed to start server: Request to assign label to version 2 "
                          "of model caption, which is not currently available for inference",
                          status=1)
    broken = tmp_path / "broken"
    os.makedirs(broken / "1")
    (broken / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    bad = _start(str(broken), tmp_path)
    assert_one_line_error(bad, "Failed to start server: caption did not become available",
                          "version 1", status=1)
