"""Serving over real sockets: the gRPC/REST client against the TF-Serving-compatible local
server (each signature, batches, TLS, every failure's message and exit status, a new version
picked up under load without a failed request)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from concurrent import futures

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import (ROOT, TEST_IDS, TINY, LocalServer, assert_one_line_error, expected_captions,
                      image_path, model_base, predict_grpc, run_module, write_image)
from serving.client import (EXIT_DEADLINE, EXIT_NOT_FOUND, EXIT_REJECTED, EXIT_UNREACHABLE,
                            TLS, CaptionClient, ClientError)

# Its module fixtures are expensive: one xdist worker runs all its tests (launch/test.sh).
pytestmark = pytest.mark.xdist_group("serving")


@pytest.fixture(scope="module")
def base(tiny_export, tmp_path_factory):
    return model_base(tiny_export, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    running = LocalServer(base, tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(tiny_export):
    """The export called in-process (its methods take the signatures' defaults): what every
    served answer must equal."""
    return tf.saved_model.load(tiny_export)


@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.setting("model_base_path", "rest_port", "ready_file")
def test_single_and_batched_images(server, reference, tiny_run, transport):
    paths = [image_path(tiny_run[0], i) for i in TEST_IDS]
    kwargs = {"rest": server.rest} if transport == "rest" else {}
    with CaptionClient(server.grpc, **kwargs) as client:
        one = client.caption(paths[:1])
        batch = client.caption(paths)
    want = expected_captions(reference, paths)
    assert [r["caption"] for r in one] == want[:1]
    assert [r["caption"] for r in batch] == want
    direct = reference.serving_default(image_bytes=tf.constant([open(paths[0], "rb").read()]))
    n = int(direct["length"][0])
    assert batch[0]["tokens"] == direct["tokens"].numpy()[0][:n].tolist()
    assert batch[0]["log_prob"] == pytest.approx(float(direct["log_prob"][0]), abs=1e-4)


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_beam_search_signature(server, reference, tiny_run, transport):
    paths = [image_path(tiny_run[0], i) for i in TEST_IDS[:2]]
    kwargs = {"rest": server.rest} if transport == "rest" else {}
    results = CaptionClient(server.grpc, **kwargs).caption(paths, beam=3)
    direct = reference.beam_search(
        image_bytes=tf.constant([open(p, "rb").read() for p in paths]),
        beam_width=tf.fill([len(paths)], 3))
    for result, captions, scores in zip(results, direct["caption"].numpy(),
                                        direct["log_prob"].numpy()):
        assert [b["caption"] for b in result["beams"]] == [c.decode() for c in captions]
        assert [b["log_prob"] for b in result["beams"]] == pytest.approx(scores, abs=1e-4)
        assert result["caption"] == result["beams"][0]["caption"]


def test_sample_and_caption_features_signatures_over_grpc(server, reference, tiny_run):
    images = np.array([open(image_path(tiny_run[0], i), "rb").read() for i in TEST_IDS],
                      dtype=object)
    response, sampled = predict_grpc(server, "sample", image_bytes=images,
                                 temperature=np.full([4], 1.5, np.float32),
                                 seed=np.arange(4, dtype=np.int64))
    want = reference.sample(image_bytes=tf.constant(images), temperature=tf.fill([4], 1.5),
                               seed=tf.range(4, dtype=tf.int64))
    np.testing.assert_array_equal(sampled["tokens"], want["tokens"].numpy())
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "sample"
    features = np.random.default_rng(0).normal(size=(2, 8, 8, 432)).astype(np.float32)
    _, out = predict_grpc(server, "caption_features", features=features)
    np.testing.assert_array_equal(
        out["tokens"], reference.caption_features(features=tf.constant(features))["tokens"])


def test_model_metadata_and_status(server):
    import grpc
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, prediction_service_pb2_grpc)

    with grpc.insecure_channel(server.grpc) as channel:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = "caption"
        metadata = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
            request, timeout=30)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        metadata.metadata["signature_def"].Unpack(signatures)
        assert set(signatures.signature_def) == {"serving_default", "caption_features",
                                                 "beam_search", "sample", "model_card"}
        beam = signatures.signature_def["beam_search"]
        assert set(beam.inputs) == {"image_bytes", "beam_width", "max_length", "min_length",
                                    "no_repeat_ngram", "repetition_penalty", "length_penalty"}
        # The defaults a client may rely on travel with the metadata, as from TF Serving.
        assert {k: tf.make_ndarray(v).tolist() for k, v in beam.defaults.items()} == {
            "max_length": [0], "min_length": [0], "no_repeat_ngram": [0],
            "repetition_penalty": [1.0], "length_penalty": [0.0]}
        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name = "caption"
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            status_request, timeout=30)
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
    import urllib.request

    with urllib.request.urlopen(f"{server.rest}/v1/models/caption", timeout=30) as reply:
        assert json.loads(reply.read())["model_version_status"][0]["state"] == "AVAILABLE"


def _client_cli(server, *args: str) -> subprocess.CompletedProcess:
    return run_module("serving.client", f"--server={server.grpc}", *args, timeout=120)


@pytest.mark.setting("model_card")
def test_the_served_model_card_is_the_exports_and_says_what_made_it(server, tiny_run,
                                                                     tiny_export):
    """`--model_card` asks the served version (its `model_card` signature) over gRPC and REST:
    the card equals the export's assets.extra/model_card.json, which names this checkout's
    commit, the frameworks, the cache's records fingerprint, the backbone, the settings of
    `tiny_run` and the step of the checkpoint exported."""
    from dist_caption.data import pipeline
    from serving import contract

    with open(os.path.join(tiny_export, contract.MODEL_CARD_FILE)) as f:
        card = json.load(f)
    result = _client_cli(server, "--model_card")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == card
    with CaptionClient(server.grpc, rest=server.rest) as client:
        assert client.model_card() == card

    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert card["code"]["export"]["commit"] == card["code"]["training"]["commit"] == head
    assert isinstance(card["code"]["export"]["dirty"], bool)
    assert card["frameworks"] == {"tensorflow": tf.__version__, "keras": keras.__version__}
    manifest = pipeline.load_manifest(tiny_run[1])
    assert card["data"]["records_sha256"] == manifest["records_sha256"]
    assert card["data"]["dataset"] == "synthetic"
    assert card["backbone"]["name"] == "patches" and card["backbone"]["weights"] == "none"
    assert card["settings"]["training"]["steps_per_epoch"] == 6
    assert card["settings"]["model"]["units"] == TINY["units"]
    assert card["checkpoint"]["step"] == 6
    assert card["model"]["version"] == int(os.path.basename(tiny_export))
    assert card["model"]["signatures"] == list(contract.SIGNATURES)

    both = _client_cli(server, "--model_card", image_path(tiny_run[0], "37"))
    assert_one_line_error(both, "--model_card takes no image files")


@pytest.mark.setting("server", "rest", "json")
def test_client_cli_prints_captions_and_json(server, reference, tiny_run):
    paths = [image_path(tiny_run[0], i) for i in TEST_IDS[:2]]
    want = expected_captions(reference, paths)
    result = _client_cli(server, *paths)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{p}: {c}" for p, c in zip(paths, want)]
    result = run_module("serving.client", f"--rest={server.rest}", "--json", paths[0])
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["image"] == paths[0] and row["caption"] == want[0]
    assert set(row) == {"image", "caption", "tokens", "log_prob"}


@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.setting("client:beam")
def test_client_cli_beam_prints_ranked_beams(server, reference, tiny_run, transport):
    path = image_path(tiny_run[0], "37")
    where = f"--rest={server.rest}" if transport == "rest" else f"--server={server.grpc}"
    result = run_module("serving.client", where, "--beam=3", path, timeout=120)
    assert result.returncode == 0, result.stderr
    direct = reference.beam_search(image_bytes=tf.constant([open(path, "rb").read()]),
                                      beam_width=tf.constant([3]))
    captions = [c.decode() for c in direct["caption"].numpy()[0]]
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}:"
    assert [line.split(". ", 1)[1].rsplit("  (log-prob", 1)[0] for line in lines[1:]] == captions


@pytest.mark.parametrize("args, status, needles", [
    (["--model_name=nope"], EXIT_NOT_FOUND, ["model 'nope'", "Servable not found"]),
    (["--version=7"], EXIT_NOT_FOUND, ["version 7", "Specific(caption, 7)"]),
    (["--version_label=canary"], EXIT_NOT_FOUND, ["label 'canary'", "Unrecognized servable"]),
    (["--signature=nope"], EXIT_NOT_FOUND, ['Serving signature key "nope" not found']),
    (["--timeout=0.001"], EXIT_DEADLINE, ["no answer from", "within 0.001s", "--timeout"]),
])
@pytest.mark.setting("client:model_name", "client:version", "version_label", "signature",
                     "timeout")
def test_client_failures_are_one_line_with_their_exit_status(server, tiny_run, args, status,
                                                             needles):
    result = _client_cli(server, image_path(tiny_run[0], "37"), *args)
    assert_one_line_error(result, *needles, status=status)


@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.setting("max_length", "min_length", "client:no_repeat_ngram", "repetition_penalty",
                     "client:length_penalty")
def test_client_decoding_controls_reach_the_model(server, reference, tiny_run, transport):
    """`--min_length 20 --no_repeat_ngram 3 --repetition_penalty 2 --max_length 22` (gRPC
    and REST): the captions the export gives for those inputs, which differ from the default
    ones; a bad value is the server's INVALID_ARGUMENT as one line, exit 6. A gRPC request
    that leaves the controls out gets the defaults."""
    paths = [image_path(tiny_run[0], i) for i in TEST_IDS]
    where = [f"--rest={server.rest}"] if transport == "rest" else []
    flags = ["--min_length=20", "--no_repeat_ngram=3", "--repetition_penalty=2",
             "--max_length=22"]
    result = _client_cli(server, *paths, *where, *flags, "--json")
    assert result.returncode == 0, result.stderr
    got = [json.loads(line)["caption"] for line in result.stdout.splitlines()]
    images = tf.constant([open(p, "rb").read() for p in paths])
    want = reference.serving_default(
        image_bytes=images, min_length=tf.constant([20]), no_repeat_ngram=tf.constant([3]),
        repetition_penalty=tf.constant([2.0]), max_length=tf.constant([22]))["caption"]
    assert got == [c.decode() for c in want.numpy()]
    assert got != expected_captions(reference, paths)
    assert all(20 <= len(c.split()) <= 22 for c in got)
    bad = _client_cli(server, paths[0], *where, "--repetition_penalty=0.5")
    assert_one_line_error(bad, "the server rejected the request: ",
                          "repetition_penalty is [0.5]", "at least 1", status=EXIT_REJECTED)
    beams = _client_cli(server, *paths[:2], *where, "--beam=3", "--length_penalty=1", "--json")
    assert beams.returncode == 0, beams.stderr
    want = reference.beam_search(image_bytes=images[:2], beam_width=tf.fill([2], 3),
                                 length_penalty=tf.constant([1.0]))["caption"].numpy()
    assert [[b["caption"] for b in json.loads(line)["beams"]]
            for line in beams.stdout.splitlines()] == [[c.decode() for c in row] for row in want]
    assert_one_line_error(_client_cli(server, paths[0], *where, "--length_penalty=1"),
                          "the serving_default signature takes no length_penalty: add --beam N",
                          status=2)
    if transport == "grpc":
        _, out = predict_grpc(server, "serving_default", image_bytes=images.numpy())
        assert [c.decode() for c in out["caption"]] == expected_captions(reference, paths)


def test_the_client_captions_with_an_export_from_before_the_decoding_controls(tmp_path):
    """A served SavedModel whose serving_default takes image bytes only, as exports did before
    the decoding controls: asked for no control, the client retries without them and captions
    (gRPC and REST); asked for one, the server's refusal is the one-line error, exit 6."""

    class Before(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serving_default(self, image_bytes):
            n = tf.size(image_bytes)
            return {"caption": tf.fill([n], "a caption from before"),
                    "tokens": tf.fill([n, 2], 5), "length": tf.fill([n], 2),
                    "log_prob": tf.zeros([n])}

    module = Before()
    tf.saved_model.save(module, str(tmp_path / "before" / "1"),
                        signatures={"serving_default": module.serving_default})
    old = LocalServer(str(tmp_path / "before"), tmp_path)
    try:
        image = open(write_image(str(tmp_path / "img.jpg")), "rb").read()
        for kwargs in ({}, {"rest": old.rest}):
            with CaptionClient(old.grpc, **kwargs) as client:
                assert client.caption([image, image])[1]["caption"] == "a caption from before"
                with pytest.raises(ClientError, match=r"Sent extra: \{max_length,|keys must be "
                                                      r"equal to: image_bytes") as refused:
                    client.caption([image], controls={"max_length": 3})
                assert refused.value.exit_code == EXIT_REJECTED
    finally:
        old.stop()


def test_client_names_unreadable_and_rejected_images(server, tiny_run, tmp_path):
    missing = run_module("serving.client", f"--server={server.grpc}", str(tmp_path / "no.jpg"))
    assert_one_line_error(missing, f"cannot read image {tmp_path / 'no.jpg'}",
                          "No such file", status=2)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    rejected = _client_cli(server, image_path(tiny_run[0], "37"), str(bad))
    assert_one_line_error(rejected, f"the server rejected the request: {bad}: is truncated",
                          status=EXIT_REJECTED)


@pytest.mark.alone
def test_client_reports_an_unreachable_server_after_retrying(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ClientError, match=f"cannot reach the model server at localhost:{port} "
                                          "within 2s") as caught:
        CaptionClient(f"localhost:{port}", timeout=2).caption([b"x"])
    assert caught.value.exit_code == EXIT_UNREACHABLE
    assert 1.5 < time.monotonic() - start < 10, "retries must use the deadline, and only it"
    result = run_module("serving.client", f"--server=localhost:{port}", "--timeout=3",
                        __file__)
    assert_one_line_error(result, "cannot reach the model server", status=EXIT_UNREACHABLE)


def _certificates(folder) -> dict[str, str]:
    """A CA, a server certificate for localhost and a client certificate, made by openssl."""
    paths = {name: str(folder / f"{name}.pem") for name in (
        "ca", "ca_key", "server", "server_key", "client", "client_key")}

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", paths["ca_key"], "-out", paths["ca"], "-subj", "/CN=test-ca")
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        csr = str(folder / f"{name}.csr")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", paths[f"{name}_key"],
                "-out", csr, "-subj", f"/CN={'localhost' if name == 'server' else 'client'}")
        openssl("x509", "-req", "-in", csr, "-CA", paths["ca"], "-CAkey", paths["ca_key"],
                "-CAcreateserial", "-days", "2", "-out", paths[name], "-extfile", str(ext))
    return paths


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no `openssl` to make certificates")
@pytest.mark.setting("ssl_cert", "ssl_key", "ssl_client_ca", "ca_cert", "client_cert",
                     "client_key")
def test_mutual_tls(base, tiny_run, tmp_path):
    certs = _certificates(tmp_path)
    secure = LocalServer(base, tmp_path, f"--ssl_cert={certs['server']}",
                         f"--ssl_key={certs['server_key']}",
                         f"--ssl_client_ca={certs['ca']}")
    try:
        path = image_path(tiny_run[0], "37")
        tls = TLS(certs["ca"], certs["client"], certs["client_key"])
        assert CaptionClient(secure.grpc, tls=tls).caption([path])[0]["caption"]
        with pytest.raises(ClientError) as no_client_cert:
            CaptionClient(secure.grpc, timeout=3, tls=TLS(certs["ca"])).caption([path])
        assert no_client_cert.value.exit_code == EXIT_UNREACHABLE
        with pytest.raises(ClientError) as plaintext:
            CaptionClient(secure.grpc, timeout=3).caption([path])
        assert plaintext.value.exit_code == EXIT_UNREACHABLE
        result = run_module("serving.client", f"--server={secure.grpc}", "--tls",
                            f"--ca_cert={certs['ca']}", f"--client_cert={certs['client']}",
                            f"--client_key={certs['client_key']}", path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{path}: ")
        # The REST port speaks HTTPS with the same certificates, and checks the client's too.
        https = secure.rest.replace("http://", "https://")
        want = CaptionClient(secure.grpc, tls=tls).caption([path])[0]["caption"]
        assert CaptionClient(rest=https, tls=tls).caption([path])[0]["caption"] == want
        for refused in (TLS(certs["ca"]), None):
            with pytest.raises(ClientError) as caught:
                CaptionClient(rest=https if refused else secure.rest, timeout=3,
                              tls=refused).caption([path])
            assert caught.value.exit_code == EXIT_UNREACHABLE, caught.value
        with pytest.raises(ClientError, match="TLS over REST needs an https:// URL"):
            CaptionClient(rest=secure.rest, tls=tls)
        result = run_module("serving.client", f"--rest={https}", f"--ca_cert={certs['ca']}",
                            f"--client_cert={certs['client']}",
                            f"--client_key={certs['client_key']}", "--beam=2", path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == f"{path}:"
        assert result.stdout.splitlines()[1].startswith("  1. ")
    finally:
        secure.stop()


def test_a_new_version_is_served_without_restart_or_failed_request(base, server, tiny_run):
    from tensorflow_serving.apis import get_model_status_pb2

    images = np.array([open(image_path(tiny_run[0], "37"), "rb").read()], dtype=object)
    versions, timeline, errors, stop = [], [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                start = time.monotonic()
                response, _ = predict_grpc(server, "serving_default", image_bytes=images)
                versions.append(response.model_spec.version.value)
                timeline.append((start, time.monotonic(), versions[-1]))
            except Exception as e:  # noqa: BLE001 - any failure fails the test below
                errors.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(32)]  # the load of a busy server
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        staging = os.path.join(base, ".incoming")
        shutil.copytree(os.path.join(base, "1"), staging)
        os.rename(staging, os.path.join(base, "2"))  # as dist_caption.export publishes
        deadline = time.monotonic() + 90
        while (not versions or versions[-1] != 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert versions[0] == 1 and versions[-1] == 2
    # Once version 2 has answered, every request sent afterwards gets version 2.
    switched = min(end for _, end, version in timeline if version == 2)
    assert {version for start, _, version in timeline if start > switched} == {2}
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc

    with grpc.insecure_channel(server.grpc) as channel:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "caption"
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request)
    states = {s.version: s.state for s in status.model_version_status}
    assert states == {2: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
                      1: get_model_status_pb2.ModelVersionStatus.END}


@pytest.mark.setting("enable_batching", "max_batch_size", "batch_timeout_micros")
def test_batching_merges_requests_and_fails_a_merged_batch_together_as_tf_serving(
        base, reference, tiny_run, tmp_path):
    batched = LocalServer(base, tmp_path, "--enable_batching", "--batch_timeout_micros=500000",
                          "--max_batch_size=8")
    try:
        paths = [image_path(tiny_run[0], i) for i in TEST_IDS]
        want = expected_captions(reference, paths)

        def together(requests: list) -> list:
            """Sends the requests at once (one client each): answers or ClientErrors."""
            start = threading.Barrier(len(requests))

            def one(images):
                start.wait()
                try:
                    return CaptionClient(batched.grpc).caption(images)
                except ClientError as e:
                    return e
            with futures.ThreadPoolExecutor(len(requests)) as pool:
                return list(pool.map(one, requests))

        got = together([[p] for p in paths * 2])
        assert [r[0]["caption"] for r in got] == want * 2
        # One bad image fails every request of its merged batch with its error, as TensorFlow
        # Serving's batching session does; the index is into that batch, which the client says.
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"\xff\xd8\xff" + bytes(100))
        failed = together([[paths[0]], [str(bad)], [paths[1]], [paths[2]]])
        assert all(isinstance(f, ClientError) and f.exit_code == EXIT_REJECTED for f in failed)
        assert {str(f).split(": ", 1)[1] for f in failed} == {str(failed[0]).split(": ", 1)[1]}
        assert "of a batch of 4 that the server merged this request of 1 into: is truncated" \
            in str(failed[0])
        with pytest.raises(ClientError, match="Task size 9 is larger than maximum input batch "
                                              "size 8"):
            CaptionClient(batched.grpc).caption(paths * 2 + paths[:1])
        assert [r["caption"] for r in CaptionClient(batched.grpc).caption(paths)] == want
        # A decoding control left out takes its one-value default: right for one image; for
        # more, batching refuses it as TensorFlow Serving's batching session does (every input
        # at the request's batch size), which is why the client sends every control.
        import grpc

        images = np.array([open(p, "rb").read() for p in paths], dtype=object)
        _, one = predict_grpc(batched, "serving_default", image_bytes=images[:1])
        assert [c.decode() for c in one["caption"]] == want[:1]
        with pytest.raises(grpc.RpcError, match="must have equal 0th-dimension size"):
            predict_grpc(batched, "serving_default", image_bytes=images)
    finally:
        batched.stop()


def test_waiting_for_a_server_prints_its_port_or_says_it_exited(server, tmp_path):
    """`python -m serving.local_server.wait READY PID`, the quickstart's wait: the
    gRPC port once the ready file is there; one error line if the process exits first, or
    after the timeout; nothing left hanging."""
    import sys

    def wait(*args):
        return subprocess.run([sys.executable, "-m", "serving.local_server.wait", *args],
                              capture_output=True, text=True, timeout=60)

    ready = server.ready  # written by the running server: its ports
    done = wait(ready, str(server.process.pid))
    assert (done.returncode, done.stdout) == (0, f"{server.grpc.rsplit(':', 1)[1]}\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    result = wait(str(tmp_path / "never"), str(gone.pid), "30")
    assert (result.returncode, result.stderr) == (
        1, "error: the local server exited before it was ready\n")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        start = time.monotonic()
        result = wait(str(tmp_path / "never"), str(sleeper.pid), "1")
        assert (result.returncode, result.stderr) == (
            1, "error: the local server was not ready after 1 s\n")
        assert time.monotonic() - start < 20
    finally:
        sleeper.kill()
        sleeper.wait()
