"""The export matrix: decoder {transformer, gru_attention} x training precision {float32,
mixed_bfloat16} x {plain, --export_xla}. Each of the 8 cells is trained (a few steps), exported,
loaded through TensorFlow Serving's Session path, and served by one local server, the
`attention` output of `serving_default` fetched over gRPC.

Shaped to be cheap: 4 tiny runs, each exported twice (the same weights, plain and XLA); one
server serves the 8 exports as versions 1..8 of one model (the local server serves one model;
`all` version policy) and is started after the first export, so it loads the others while they
are being written. Precision is a training setting: `python -m dist_caption.export` runs in a
fresh process, under Keras's default float32 policy, and the exports here are made under it too
(training.run leaves its policy set process-wide), so XLA and plain exports of one run agree to
float32 rounding whatever precision the run was trained in.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import time

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from conftest import TEST_IDS, TINY, LocalServer, image_path, predict_grpc
from dist_caption import exporting, training
from serving.local_server import loading

# The module fixtures are shared by every test: one xdist worker runs them all.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("matrix")]

DECODERS = ("transformer", "gru_attention")
PRECISIONS = ("float32", "mixed_bfloat16")
CELLS = [(decoder, precision, xla) for decoder in DECODERS for precision in PRECISIONS
         for xla in (False, True)]
STATE = get_model_status_pb2.ModelVersionStatus  # AVAILABLE, END, ...
VERSION = {cell: i + 1 for i, cell in enumerate(CELLS)}  # the cell's version on the server
GREEDY_OUTPUTS = {"caption", "tokens", "length", "log_prob", "attention"}  # export.py docstring
# Fetched from the server: `tokens` left out, so the filter is seen to apply.
OUTPUT_FILTER = ("caption", "length", "log_prob", "attention")
# The test images and train image 7: the tiny transformers end its caption later than the
# others (24 tokens, not 21), so the batch holds captions that end at different steps and the
# attention rows after [END] are seen to stay 0 (`test_the_batch_ends_captions_apart`). The
# tiny GRUs never emit [END] after 3 steps: their rows are all words.
IMAGE_IDS = (*TEST_IDS, "7")
MAX_BATCH = 8  # the images in one request; warm-ups only at batch 1


def cell_id(cell) -> str:
    decoder, precision, xla = cell
    return f"{decoder}-{precision}-{'xla' if xla else 'plain'}"


def config_text(base: str) -> str:
    """A ModelServerConfig serving every version under `base`."""
    return ('model_config_list {\n  config {\n    name: "caption"\n'
            f'    base_path: "{base}"\n    model_platform: "tensorflow"\n'
            '    model_version_policy { all {} }\n  }\n}\n')


def model_status(server) -> dict[int, tuple[int, int, str]]:
    """version -> (state, error code, error message), over gRPC GetModelStatus."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "caption"
    with grpc.insecure_channel(server.grpc) as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            request, timeout=30)
    return {s.version: (s.state, s.status.error_code, s.status.error_message)
            for s in response.model_version_status}


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    """(decoder, precision) -> a model_dir trained for TINY's 3 steps on `tiny_cache`."""
    _, cache_dir = tiny_cache
    root = tmp_path_factory.mktemp("matrix_runs")
    found = {}
    try:
        for decoder in DECODERS:
            for precision in PRECISIONS:
                model_dir = str(root / f"{decoder}-{precision}")
                training.run(training.TrainConfig(cache_dir=cache_dir, model_dir=model_dir, **{
                    **TINY, "decoder": decoder, "precision": precision}))
                found[decoder, precision] = model_dir
    finally:
        keras.mixed_precision.set_global_policy("float32")  # as `python -m ...export` has it
    return found


@pytest.fixture(scope="module")
def matrix(runs, tmp_path_factory):
    """{"paths": cell -> export folder, "server": a Future of the LocalServer serving them all}.

    The server is started (in a thread: LocalServer waits for its first version) as soon as
    version 1 is written; it picks up the others as they are renamed into place."""
    root = tmp_path_factory.mktemp("matrix")
    base = str(root / "caption")
    config = root / "models.config"
    config.write_text(config_text(base))
    paths, starting = {}, None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            for cell in CELLS:
                decoder, precision, xla = cell
                paths[cell] = exporting.export(runs[decoder, precision], base, xla=xla,
                                            version=VERSION[cell], max_batch=MAX_BATCH,
                                            warmup_batch_sizes=())
                if starting is None:
                    starting = pool.submit(LocalServer, None, root,
                                           f"--model_config_file={config}",
                                           "--xla_cpu_compilation_enabled")
            yield {"paths": paths, "server": starting, "log": root / "server.log"}
        finally:
            if starting is not None:
                try:
                    starting.result().stop()
                except Exception:  # it did not start: the test waiting on it said why
                    pass


@pytest.fixture(scope="module")
def images(tiny_cache):
    synthetic_dir, _ = tiny_cache
    return np.array([open(image_path(synthetic_dir, i), "rb").read() for i in IMAGE_IDS],
                    object)


@pytest.fixture(scope="module")
def reference(matrix, images):
    """(decoder, precision) -> the plain export's serving_default outputs (numpy), through
    `tf.saved_model.load` in this process: what every Session-path and served answer of the
    two exports of that run must equal."""

    @functools.cache
    def outputs(decoder: str, precision: str) -> dict[str, np.ndarray]:
        loaded = tf.saved_model.load(matrix["paths"][decoder, precision, False])
        out = loaded.serving_default(image_bytes=tf.constant(images))
        return {k: v.numpy() for k, v in out.items()}

    return outputs


def exported_shape(path: str) -> tuple[int, int]:
    """(L, H*W) of the export, from its own metadata: max_len and the feature grid."""
    with open(os.path.join(path, exporting.METADATA_FILE)) as f:
        model = json.load(f)["model"]
    rows, cols, _ = model["feature_shape"]
    return model["max_len"], rows * cols


def check_attention(attention: np.ndarray, length: np.ndarray, shape: tuple[int, int]) -> None:
    """[B, L, H*W]: for each generated word (up to and including [END]) a distribution over
    the grid cells (non-negative, sums to 1), zeros after [END]."""
    max_len, cells = shape
    assert attention.shape == (len(IMAGE_IDS), max_len, cells)
    assert attention.dtype == np.float32
    assert attention.min() >= 0, "negative attention"
    assert (length >= 1).all() and (length <= max_len).all(), length
    generated = np.arange(max_len)[None, :] < length[:, None]
    np.testing.assert_allclose(attention.sum(-1)[generated], 1.0, atol=1e-5,
                               err_msg="attention of a word does not sum to 1")
    assert not attention[~generated].any(), "attention after [END]"
    # Attention depends on the image: the images do not all share the first word's map.
    assert not np.allclose(attention[0, 0], attention[1:, 0]), "image-blind attention"


def check_equal(got: dict, want: dict, names) -> None:
    """Strings and ints exactly, floats to float32 rounding: XLA fuses differently (measured:
    log_prob within 4e-6 of about -45, attention within 2e-8), while from one image to the
    next log_prob moves by 0.1 and attention by 1e-3."""
    for name in names:
        if want[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def xla_compiled(path: str) -> bool:
    """Whether any function of the export's MetaGraph is marked for XLA compilation."""
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    functions = saved.meta_graphs[0].graph_def.library.function
    return any(f.attr["_XlaMustCompile"].b for f in functions if "_XlaMustCompile" in f.attr)


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_the_session_path_captions_like_tf_saved_model_load(matrix, reference, images, cell):
    decoder, precision, xla = cell
    path = matrix["paths"][cell]
    assert xla_compiled(path) == xla
    bundle = loading.SavedModelBundle(path)  # TF Serving's loader, restore op and init op
    try:
        assert set(bundle.signature_defs) == set(exporting.SIGNATURES)
        sig = bundle.signature_defs["serving_default"]
        assert set(sig.outputs) == GREEDY_OUTPUTS
        max_len, cells = exported_shape(path)
        assert tf.TensorShape(sig.outputs["attention"].tensor_shape).as_list() == \
            [None, max_len, cells]
        out = bundle.run("serving_default", {"image_bytes": images})
    finally:
        bundle.close()
    assert set(out) == GREEDY_OUTPUTS
    # An XLA export is the plain export's weights: it must caption as the plain one does.
    want = reference(decoder, precision)
    check_equal(out, want, GREEDY_OUTPUTS)
    assert all(out["caption"]), "an empty caption"
    check_attention(out["attention"], out["length"], (max_len, cells))


@pytest.fixture(scope="module")
def server(matrix):
    """(the local server, version -> (state, error code, error message)) once every cell's
    version has loaded or failed to."""
    running = matrix["server"].result()
    settled = (STATE.AVAILABLE, STATE.END)
    deadline = time.monotonic() + 300
    while True:
        status = model_status(running)
        if all(status.get(v, (None,))[0] in settled for v in VERSION.values()):
            return running, status
        assert time.monotonic() < deadline, (status, matrix["log"].read_text()[-3000:])
        time.sleep(0.3)


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_one_server_serves_every_cell_with_its_attention(server, matrix, reference, images,
                                                         cell):
    decoder, precision, _ = cell
    server, status = server
    state, _, message = status[VERSION[cell]]
    assert state == STATE.AVAILABLE, message
    response, out = predict_grpc(server, "serving_default", version=VERSION[cell],
                                 output_filter=OUTPUT_FILTER, timeout=120, image_bytes=images)
    assert response.model_spec.version.value == VERSION[cell]
    assert set(out) == set(OUTPUT_FILTER)
    want = reference(decoder, precision)
    check_equal(out, want, OUTPUT_FILTER)
    check_attention(out["attention"], out["length"], exported_shape(matrix["paths"][cell]))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_batch_ends_captions_apart(reference, precision):
    """Else the zeros after [END] that `check_attention` asserts would hold trivially: the loop
    stops when every caption has ended. If training changes, pick other IMAGE_IDS."""
    length = reference("transformer", precision)["length"]
    assert length.min() < length.max(), length
