"""What the Kubernetes overlays configure, run by the local server: TensorFlow Serving's
--batching_parameters_file with allowed_batch_sizes (merged batches padded as batching_session.cc
pads them) and --model_config_file with a specific version policy and version labels (the canary
overlay), served to `serving.client --version_label`."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf

from conftest import (ROOT, TEST_IDS, LocalServer, assert_one_line_error, default_controls,
                      expected_captions, image_path, predict_grpc, run_module)
from dist_caption import exporting
from serving import publish
from serving.client import EXIT_NOT_FOUND
from serving.local_server import batching, loading

K8S = os.path.join(ROOT, "k8s", "serving")
XLA_BATCHING = os.path.join(K8S, "components", "xla-batching", "batching.config")
CANARY = os.path.join(K8S, "overlays", "canary", "models.config")


def test_merged_batches_are_padded_to_the_next_allowed_size_with_the_last_tasks_first_row():
    seen = []

    def call(inputs: dict) -> dict:
        seen.append(inputs["x"].copy())
        return {"y": inputs["x"] * 10}

    batcher = batching.Batcher(call, max_batch_size=8, timeout=1.0, threads=1,
                               allowed_batch_sizes=(1, 2, 4, 8))
    requests = [np.array([[i, i]], np.float32) for i in (1, 2, 3)]
    results = [None] * 3

    def send(i: int) -> None:
        results[i] = batcher.submit({"x": requests[i]})["y"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert [len(batch) for batch in seen] == [4]  # 3 rows, padded to 4
    np.testing.assert_array_equal(seen[0][3], seen[0][2])  # a copy of the last task's first row
    for request, result in zip(requests, results):  # padding rows' outputs are dropped
        np.testing.assert_array_equal(result, request * 10)


def test_allowed_batch_sizes_must_end_at_max_batch_size_as_in_tensorflow_serving():
    with pytest.raises(ValueError, match=r"^Last entry in allowed_batch_sizes must match "
                       r"max_batch_size; last entry was 32; expected 64$"):
        batching.Batcher(lambda x: x, 64, 0.0, 1, allowed_batch_sizes=(1, 8, 32))


def test_the_xla_overlays_batching_file_parses_and_matches_the_exports_warmup_sizes(tmp_path):
    params = batching.read_batching_parameters(XLA_BATCHING)
    assert params == {"max_batch_size": 64, "timeout": 0.002, "threads": 2,
                      "allowed_batch_sizes": exporting.DEFAULT_WARMUP_BATCH_SIZES}
    unset = tmp_path / "unset.config"
    unset.write_text("allowed_batch_sizes: 1000\n")
    # SharedBatchScheduler's defaults for what the file leaves out.
    assert batching.read_batching_parameters(str(unset))["max_batch_size"] == 1000
    bad = tmp_path / "bad.config"
    bad.write_text("max_batch_size: 64\n")
    with pytest.raises(ValueError, match="bad.config is not a BatchingParameters text proto"):
        batching.read_batching_parameters(str(bad))


@pytest.mark.slow
@pytest.mark.setting("enable_batching", "batching_parameters_file")
def test_the_server_pads_merged_batches_and_refuses_a_mismatched_batching_file(
        tiny_export, tiny_run, tmp_path):
    base = tmp_path / "caption"
    shutil.copytree(tiny_export, base / "1")
    wrong = tmp_path / "wrong.config"
    wrong.write_text("max_batch_size { value: 8 }\nallowed_batch_sizes: 1\n"
                     "allowed_batch_sizes: 4\n")
    refused = run_module("serving.local_server", f"--model_base_path={base}", "--port=0",
                         "--enable_batching", f"--batching_parameters_file={wrong}",
                         timeout=180)
    assert_one_line_error(refused, "Failed to start server", "Last entry in allowed_batch_sizes "
                          "must match max_batch_size; last entry was 4; expected 8", status=1)
    assert_one_line_error(run_module("serving.local_server", f"--model_base_path={base}",
                                     f"--batching_parameters_file={wrong}"),
                          "batching_parameters_file is set without setting "
                          "server_options.enable_batching to true")
    good = tmp_path / "batching.config"  # the XLA overlay's file, sized to this export's 8
    good.write_text(open(XLA_BATCHING).read().replace("{ value: 64 }", "{ value: 8 }")
                    .replace("allowed_batch_sizes: 16\n", "").replace(
                        "allowed_batch_sizes: 32\n", "").replace("allowed_batch_sizes: 64\n", ""))
    server = LocalServer(str(base), tmp_path, "--enable_batching",
                         f"--batching_parameters_file={good}")
    try:
        paths = [image_path(tiny_run[0], i) for i in TEST_IDS[:3]]  # 3 rows, run as 4
        # Every input at the batch size, as the client sends them (a batching server needs it).
        _, out = predict_grpc(server, "serving_default", **default_controls("serving_default", 3),
                              image_bytes=np.array([open(p, "rb").read() for p in paths], object))
        reference = tf.saved_model.load(tiny_export)
        assert [c.decode() for c in out["caption"]] == expected_captions(reference, paths)
        assert out["tokens"].shape[0] == 3
    finally:
        server.stop()


def promoted(config: str) -> str:
    """The README's one edit that promotes the canary: "stable" moves to version 2."""
    edited = re.sub(r'(key: "stable"\s+value:) 1', r"\1 2", config)
    assert edited != config
    return edited


def test_the_canary_config_reads_as_a_specific_policy_with_labels_and_promotes_in_one_edit(
        tmp_path):
    settings = loading.read_model_config(CANARY)
    assert settings == {"name": "caption", "base_path": "/models/caption", "versions": (1, 2),
                        "labels": {"stable": 1, "canary": 2}}
    edited = tmp_path / "models.config"
    edited.write_text(promoted(open(CANARY).read()))
    assert loading.read_model_config(str(edited))["labels"] == {"stable": 2, "canary": 2}


def _served_version(server, label: str | None) -> int:
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "caption"
    if label:
        request.model_spec.version_label = label
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(
        np.array([exporting.warmup_image()], object)))
    request.output_filter.append("caption")
    with grpc.insecure_channel(server.grpc) as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=60).model_spec.version.value


@pytest.mark.slow
@pytest.mark.setting("model_config_file", "allow_version_labels_for_unavailable_models")
def test_canary_by_version_label_before_and_after_the_canary_version_arrives(
        tiny_export, tiny_run, tmp_path):
    base = tmp_path / "models" / "caption"
    shutil.copytree(tiny_export, base / "1")
    config = tmp_path / "models.config"
    config.write_text(open(CANARY).read().replace("/models/caption", str(base)))
    server = LocalServer(None, tmp_path, f"--model_config_file={config}",
                         "--allow_version_labels_for_unavailable_models")
    image = image_path(tiny_run[0], TEST_IDS[0])
    try:
        early = run_module("serving.client", image, f"--server={server.grpc}",
                           "--version_label=canary")
        assert_one_line_error(early, "Servable not found for request: Specific(caption, 2)",
                              status=EXIT_NOT_FOUND)
        publish.publish(tiny_export, str(base), version=2, check=False)
        deadline = time.monotonic() + 120
        while 2 not in loading_status(server):
            assert time.monotonic() < deadline, "version 2 was never loaded"
            time.sleep(0.3)
        canary = run_module("serving.client", image, f"--server={server.grpc}",
                            "--version_label=canary")
        assert canary.returncode == 0, canary.stderr[-2000:]
        reference = tf.saved_model.load(tiny_export)
        assert expected_captions(reference, [image])[0] in canary.stdout
        assert _served_version(server, "canary") == 2
        assert _served_version(server, "stable") == 1
        assert _served_version(server, None) == 2  # no label: the highest loaded version
    finally:
        server.stop()


def loading_status(server) -> set[int]:
    """The versions the server reports AVAILABLE."""
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "caption"
    with grpc.insecure_channel(server.grpc) as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            request, timeout=30)
    return {s.version for s in response.model_version_status
            if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE}
