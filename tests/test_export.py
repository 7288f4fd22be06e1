"""Export: the documented signatures, in-graph captions equal to the trained model's, bad images
refused by index, versions written atomically, warm-up requests TensorFlow Serving can replay."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import TEST_IDS, assert_one_line_error, run_module
from dist_caption import exporting
from dist_caption.data import text
from dist_caption.errors import UserError

# Its module fixtures are expensive: one xdist worker runs all its tests (launch/test.sh).
pytestmark = pytest.mark.xdist_group("export")


@pytest.fixture(scope="module")
def exports(tiny_run, tiny_export, tmp_path_factory):
    """(run, {"plain": version 1, "xla": version 2}) of `tiny_run`: version 1 is a copy of the
    session's `tiny_export` (the same call), version 2 exported here with XLA."""
    base = str(tmp_path_factory.mktemp("exports") / "caption")
    shutil.copytree(tiny_export, os.path.join(base, "1"))
    paths = {"plain": os.path.join(base, "1"),
             "xla": exporting.export(tiny_run[2], base, xla=True, max_batch=8)}
    return tiny_run, paths


@pytest.fixture(scope="module")
def served(exports):
    return tf.saved_model.load(exports[1]["plain"])


def image_bytes(synthetic_dir: str, image_id: str) -> bytes:
    with open(os.path.join(synthetic_dir, "images", f"{int(image_id):09d}.jpg"), "rb") as f:
        return f.read()


def encode(mode: str = "RGB", size=(40, 30), fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    if fmt == "GIF":
        image = image.convert("P")
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def in_memory_greedy(model_dir: str, cache_dir: str) -> dict[str, np.ndarray]:
    """Greedy tokens of the trained model on the cached test features, keyed by image id."""
    from dist_caption.data import pipeline
    from dist_caption import run_dir
    from dist_caption.model import greedy_decode

    model, run = run_dir.restore(model_dir, "best")
    out = {}
    for batch in pipeline.image_dataset(cache_dir, "test", 8):
        decoded = greedy_decode(model, batch["features"], run["model"]["max_len"])
        for image_id, row in zip(batch["image_id"].numpy(), decoded["tokens"].numpy()):
            out[image_id.decode()] = row
    return out


def test_saved_model_cli_lists_the_documented_signatures(exports):
    result = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--all",
         "--dir", exports[1]["plain"]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    signatures = result.stdout.split("Concrete Functions")[0].split("signature_def['")[1:]
    shown = {}
    for block in signatures:
        name = block.split("'")[0]
        shown[name] = tuple(
            {k: (dtype, shape.strip()) for k, dtype, shape in re.findall(
                kind + r"\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (.+)", block)}
            for kind in ("inputs", "outputs"))
    greedy_out = {"caption": ("DT_STRING", "(-1)"), "tokens": ("DT_INT32", "(-1, 24)"),
                  "length": ("DT_INT32", "(-1)"), "log_prob": ("DT_FLOAT", "(-1)"),
                  "attention": ("DT_FLOAT", "(-1, 24, 64)")}
    controls = {"max_length": ("DT_INT32", "(-1)"), "min_length": ("DT_INT32", "(-1)"),
                "no_repeat_ngram": ("DT_INT32", "(-1)"),
                "repetition_penalty": ("DT_FLOAT", "(-1)")}
    assert shown["serving_default"] == (
        {"image_bytes": ("DT_STRING", "(-1)"), **controls}, greedy_out)
    assert shown["caption_features"] == (
        {"features": ("DT_FLOAT", "(-1, 8, 8, 432)")}, greedy_out)
    assert shown["beam_search"] == (
        {"image_bytes": ("DT_STRING", "(-1)"), "beam_width": ("DT_INT32", "(-1)"), **controls,
         "length_penalty": ("DT_FLOAT", "(-1)")},
        {"caption": ("DT_STRING", "(-1, -1)"), "tokens": ("DT_INT32", "(-1, -1, 24)"),
         "length": ("DT_INT32", "(-1, -1)"), "log_prob": ("DT_FLOAT", "(-1, -1)")})
    sample_out = {k: v for k, v in greedy_out.items() if k != "attention"}
    assert shown["sample"] == (
        {"image_bytes": ("DT_STRING", "(-1)"), "temperature": ("DT_FLOAT", "(-1)"),
         "seed": ("DT_INT64", "(-1)")}, sample_out)


def test_the_export_follows_the_serving_contract_and_records_it(exports, monkeypatch):
    """The written SignatureDefs are serving/contract.py's (the client and predict read their
    names there); the check every export passes before it is published names what differs."""
    from tensorflow.core.protobuf import saved_model_pb2

    from serving import contract

    path = exports[1]["plain"]
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    defs = {k: v for k, v in saved.meta_graphs[0].signature_def.items()
            if not k.startswith("__")}
    assert exporting.contract_mismatches(defs) == []
    with open(os.path.join(path, exporting.METADATA_FILE)) as f:
        assert json.load(f)["contract"] == contract.as_json()
    # A contract this export does not follow: each difference is named.
    monkeypatch.setitem(contract.SIGNATURES, contract.DEFAULT, contract.Signature(
        {contract.IMAGE_BYTES: "string", "max_length": "int32"}, contract.CAPTION_OUTPUTS,
        ("max_length",)))
    monkeypatch.setitem(contract.SIGNATURES, "classify", contract.SIGNATURES[contract.SAMPLE])
    assert exporting.contract_mismatches(defs) == [
        "signature classify is missing",
        "serving_default takes {'image_bytes': 'string', 'max_length': 'int32', 'min_length': "
        "'int32', 'no_repeat_ngram': 'int32', 'repetition_penalty': 'float32'}, the contract "
        "says {'image_bytes': 'string', 'max_length': 'int32'}",
        "serving_default returns ['attention', 'caption', 'length', 'log_prob', 'tokens'], the "
        "contract says ['caption', 'length', 'log_prob', 'tokens']",
        "serving_default has defaults {'max_length': 0, 'min_length': 0, 'no_repeat_ngram': 0, "
        "'repetition_penalty': 1.0}, the contract says {'max_length': 0}"]


@pytest.mark.parametrize("kind", ["plain", "xla"])
def test_served_captions_equal_the_trained_models_greedy_captions(exports, kind):
    (synthetic_dir, cache_dir, model_dir), paths = exports
    expected = in_memory_greedy(model_dir, cache_dir)
    loaded = tf.saved_model.load(paths[kind])
    images = tf.constant([image_bytes(synthetic_dir, i) for i in TEST_IDS])
    out = loaded.serving_default(image_bytes=images)
    np.testing.assert_array_equal(out["tokens"].numpy(), [expected[i] for i in TEST_IDS])
    # The caption is the detokenised tokens, with the vocabulary carried inside the export.
    from dist_caption.data.text import Vocabulary

    vocab = Vocabulary.load(os.path.join(model_dir, "vocab.txt"))
    assert [c.decode() for c in out["caption"].numpy()] == [vocab.decode(expected[i])
                                                            for i in TEST_IDS]
    assert out["caption"].numpy()[0], "an empty caption"
    np.testing.assert_allclose(out["attention"].numpy().sum(-1)[:, 0], 1.0, rtol=1e-5)


def test_caption_features_signature_captions_cached_features(exports, served):
    (_, cache_dir, model_dir), _ = exports
    from dist_caption.data import pipeline

    expected = in_memory_greedy(model_dir, cache_dir)
    batch = next(iter(pipeline.image_dataset(cache_dir, "test", 8)))
    out = served.caption_features(
        features=tf.cast(batch["features"], tf.float32))
    ids = [i.decode() for i in batch["image_id"].numpy()]
    np.testing.assert_array_equal(out["tokens"].numpy(), [expected[i] for i in ids])


def test_beam_search_width_one_is_greedy_and_wider_is_no_worse(exports, served):
    synthetic_dir = exports[0][0]
    images = tf.constant([image_bytes(synthetic_dir, i) for i in TEST_IDS])
    greedy = served.serving_default(image_bytes=images)
    one = served.beam_search(image_bytes=images, beam_width=tf.fill([4], 1))
    np.testing.assert_array_equal(one["tokens"].numpy()[:, 0], greedy["tokens"].numpy())
    np.testing.assert_array_equal(one["caption"].numpy()[:, 0], greedy["caption"].numpy())
    three = served.beam_search(image_bytes=images, beam_width=tf.fill([4], 3))
    assert three["caption"].shape == [4, 3]
    assert (three["log_prob"].numpy()[:, 0] >= greedy["log_prob"].numpy() - 1e-4).all()
    mixed = served.beam_search(image_bytes=images,
                                             beam_width=tf.constant([1, 3, 2, 1]))
    np.testing.assert_array_equal(mixed["tokens"], three["tokens"])  # the widest width rules
    for widths in ([1, 17, 1, 1], [3, 3]):
        with pytest.raises(tf.errors.InvalidArgumentError, match="it must hold one width "
                                                                 "between 1 and 16 per image"):
            served.beam_search(image_bytes=images, beam_width=tf.constant(widths))


def test_sample_is_reproducible_per_seed(exports, served):
    synthetic_dir = exports[0][0]
    images = tf.constant([image_bytes(synthetic_dir, i) for i in TEST_IDS])

    def sample(temperature, seed, count=4):
        return served.sample(
            image_bytes=images[:count], temperature=tf.fill([count], temperature),
            seed=tf.constant(seed, tf.int64, [count]))["tokens"].numpy()

    np.testing.assert_array_equal(sample(1.5, 3), sample(1.5, 3))
    assert not np.array_equal(sample(1.5, 3), sample(1.5, 4))
    # An image's caption depends on its own seed, not on its batch-mates.
    np.testing.assert_array_equal(sample(1.5, 3, count=1)[0], sample(1.5, 3)[0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="send one of each per image, "
                                                             "temperatures above 0"):
        sample(0.0, 3)


def test_a_batch_of_mixed_sizes_and_formats_is_captioned_image_by_image(served):
    images = [encode("RGB", (40, 30), "JPEG", 1), encode("RGBA", (200, 50), "PNG", 2),
              encode("RGB", (17, 90), "GIF", 3), encode("L", (64, 64), "BMP", 4),
              encode("L", (33, 21), "JPEG", 5)]
    batch = served.serving_default(image_bytes=tf.constant(images))
    assert batch["tokens"].shape == [5, 24]
    for i, image in enumerate(images):
        alone = served.serving_default(image_bytes=tf.constant([image]))
        np.testing.assert_array_equal(alone["tokens"].numpy()[0], batch["tokens"].numpy()[i])


def _truncated(data: bytes, cut: int) -> bytes:
    return data[:len(data) - cut]


BAD_IMAGES = {
    "empty": (b"", "image 1 of 2: is empty"),
    "text": (b"hello, this is not a picture at all" * 4, "image 1 of 2: is not a JPEG, PNG, GIF"),
    "short": (b"\x89PN", "image 1 of 2: is not a JPEG, PNG, GIF"),
    "truncated jpeg": (_truncated(encode(fmt="JPEG"), 300), "image 1 of 2: is truncated"),
    "truncated png": (_truncated(encode(fmt="PNG"), 30), "image 1 of 2: is truncated"),
    "truncated gif": (_truncated(encode(fmt="GIF"), 10), "image 1 of 2: is truncated"),
    "truncated bmp": (_truncated(encode(fmt="BMP"), 100), "image 1 of 2: is truncated"),
    "zero width": (encode(fmt="PNG")[:16] + b"\0\0\0\0" + encode(fmt="PNG")[20:],
                   "image 1 of 2: has a zero width or height"),
    "bomb": (encode("L", (5000, 4000), "PNG"),
             "image 1 of 2: is 5000x4000 = 20000000 pixels, above the limit of"),
}


@pytest.fixture(scope="module")
def small_limit_export(tiny_run, tmp_path_factory):
    """An export refusing images above 10 megapixels, to test the limit cheaply."""
    return tf.saved_model.load(exporting.export(
        tiny_run[2], str(tmp_path_factory.mktemp("limit")), max_pixels=10_000_000,
        max_batch=8))


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_a_bad_image_fails_the_request_by_index_and_the_model_stays_healthy(
        small_limit_export, case):
    data, message = BAD_IMAGES[case]
    good = encode(seed=9)
    serve = small_limit_export.serving_default
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serve(image_bytes=tf.constant([good, data]))
    assert serve(image_bytes=tf.constant([good]))["caption"].shape == [1]


def test_batch_limits(served):
    serve = served.serving_default
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="the request holds 9 images; send between 1 and 8"):
        serve(image_bytes=tf.constant([encode()] * 9))
    with pytest.raises(tf.errors.InvalidArgumentError, match="the request holds 0 images"):
        serve(image_bytes=tf.constant([], tf.string))


def test_warmup_file_holds_prediction_logs_for_every_signature(exports):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(exports[1]["plain"], exporting.WARMUP_FILE)
    logs = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log.predict_log.request)
    assert {r.model_spec.signature_name for r in logs} == set(exporting.SIGNATURES)
    loaded = tf.saved_model.load(exports[1]["plain"])
    for request in logs:
        assert request.model_spec.name == "caption"
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = loaded.signatures[request.model_spec.signature_name](**inputs)
        batch = next(iter(inputs.values())).shape[0]
        assert next(iter(out.values())).shape[0] == batch


@pytest.mark.parametrize("kind", ["plain", "xla"])
def test_every_warmup_record_runs_on_tf_servings_loading_path_as_in_python(exports, kind):
    """What TensorFlow Serving does with a new version: a Session (restore op, init op), every
    warm-up record run by SignatureDef tensor names; the same tokens as tf.saved_model.load."""
    from serving.local_server import loading

    path = exports[1][kind]
    bundle = loading.SavedModelBundle(path)
    assert set(bundle.signature_defs) == set(exporting.SIGNATURES)
    loaded = tf.saved_model.load(path)
    logs = loading.warmup_requests(path)
    assert {log.predict_log.request.model_spec.signature_name for log in logs} == \
        set(exporting.SIGNATURES)
    for log in logs:
        request = log.predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        session = bundle.run(request.model_spec.signature_name, inputs)
        python = loaded.signatures[request.model_spec.signature_name](
            **{k: tf.constant(v) for k, v in inputs.items()})
        assert set(session) == set(python)
        for name in set(session) & {"tokens", "length", "caption", "model_card"}:
            np.testing.assert_array_equal(session[name], python[name].numpy())
        if "log_prob" in session:
            np.testing.assert_allclose(session["log_prob"], python["log_prob"].numpy(),
                                       atol=1e-5)
    bundle.close()


def test_saved_model_cli_run_captions_an_image_file(exports, tmp_path):
    """The README's `saved_model_cli run` command: the CLI's own Session path."""
    synthetic_dir = exports[0][0]
    jpeg = tmp_path / "img.jpg"
    jpeg.write_bytes(image_bytes(synthetic_dir, TEST_IDS[0]))
    request = tmp_path / "request.npy"
    subprocess.run([sys.executable, "-c", "import numpy as np, sys; np.save(sys.argv[1], "
                    "np.array([open(sys.argv[2], 'rb').read()], dtype=object))",
                    str(request), str(jpeg)], check=True, timeout=60)
    result = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "run",
         "--dir", exports[1]["plain"], "--tag_set", "serve", "--signature_def",
         "serving_default", "--inputs", f"image_bytes={request}"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = tf.saved_model.load(exports[1]["plain"])  # kept: its functions use its variables
    caption = loaded.serving_default(
        image_bytes=tf.constant([jpeg.read_bytes()]))["caption"].numpy()[0]
    assert f"Result for output key caption:\n[{caption!r}]" in result.stdout


def test_versions_increase_and_are_never_overwritten(exports):
    _, paths = exports
    base = os.path.dirname(paths["plain"])
    assert [os.path.basename(paths[k]) for k in ("plain", "xla")] == ["1", "2"]
    assert exporting.next_version(base) == 3
    with pytest.raises(UserError, match="already exists: versions are never overwritten"):
        exporting.export(exports[0][2], base, version=2)
    metadata = json.load(open(os.path.join(paths["xla"], exporting.METADATA_FILE)))
    assert metadata["xla"] is True and metadata["signatures"] == list(exporting.SIGNATURES)
    assert sorted(os.listdir(base)) == ["1", "2"]


def test_an_export_is_never_visible_half_written(tiny_run, tmp_path):
    base = str(tmp_path / "exports")
    incomplete, staging, done = [], set(), threading.Event()

    def write():
        try:
            exporting.export(tiny_run[2], base)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    while not done.is_set():  # what a TensorFlow Serving file watcher would see
        time.sleep(0.005)  # a watcher polls; spinning would take a core from the export
        for name in os.listdir(base) if os.path.isdir(base) else []:
            if not name.isdigit():
                staging.add(name)
                continue
            folder = os.path.join(base, name)
            if not all(os.path.exists(os.path.join(folder, f)) for f in (
                    "saved_model.pb", "variables/variables.index", exporting.WARMUP_FILE,
                    exporting.METADATA_FILE)):
                incomplete.append(name)
    thread.join()
    assert staging, "the watcher never saw the export being written"
    assert not incomplete
    assert os.listdir(base) == ["1"]


def test_a_failed_export_leaves_no_trace_and_earlier_versions_intact(exports, tmp_path,
                                                                     monkeypatch):
    (_, _, model_dir), paths = exports
    base = str(tmp_path / "exports")
    first = shutil.copytree(paths["plain"], os.path.join(base, "1"))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tf.saved_model, "save", disk_full)
    with pytest.raises(UserError, match=r"could not write the export under .* \(No space left "
                                        r"on device\); every existing version is untouched"):
        exporting.export(model_dir, base)
    assert os.listdir(base) == ["1"]
    reloaded = tf.saved_model.load(first)
    assert reloaded.serving_default(
        image_bytes=tf.constant([encode()]))["caption"].shape == [1]


@pytest.mark.setting("export:model_dir", "export_base")
def test_export_cli(tiny_run, tmp_path):
    base = str(tmp_path / "exports")
    result = run_module("dist_caption.export", f"--model_dir={tiny_run[2]}",
                        f"--export_base={base}", timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"exported {os.path.join(base, '1')}" in result.stdout
    missing = run_module("dist_caption.export", f"--model_dir={tmp_path / 'nope'}")
    assert_one_line_error(missing, "--model_dir: training run folder", "does not exist")


@pytest.mark.setting("saved_model", "attention_png")
def test_predict_captions_files_and_folders_and_draws_attention(exports, served, tmp_path):
    synthetic_dir = exports[0][0]
    folder = tmp_path / "pictures"
    folder.mkdir()
    for image_id in TEST_IDS[:2]:
        (folder / f"{image_id}.jpg").write_bytes(image_bytes(synthetic_dir, image_id))
    png = tmp_path / "attention.png"
    result = run_module("dist_caption.predict", str(folder), f"--saved_model={exports[1]['plain']}",
                        f"--attention_png={png}", timeout=300)
    assert result.returncode == 0, result.stderr
    expected = served.serving_default(
        image_bytes=tf.constant([image_bytes(synthetic_dir, i) for i in TEST_IDS[:2]]))
    lines = result.stdout.splitlines()
    for image_id, caption, log_prob in zip(TEST_IDS, expected["caption"].numpy(),
                                           expected["log_prob"].numpy()):
        line = f"{folder / image_id}.jpg: {caption.decode()}  (log-prob {log_prob:.2f})"
        assert line in lines
    longest = int(expected["length"].numpy().max())
    with Image.open(png) as drawn:  # one row per image, one 2-inch panel per word at 80 dpi
        assert drawn.size == (160 * longest, 160 * 2)


def test_the_attention_drawing_lights_the_cell_each_word_looked_at(tmp_path):
    """`--attention_png`: a 160-pixel panel per word, its title above the picture, and the
    picture brightest where that word's attention is (here all on one cell of a 2x2 grid)."""
    from dist_caption.prediction import PANEL, TITLE, draw_attention

    path = str(tmp_path / "grey.png")
    Image.new("RGB", (64, 64), (100, 100, 100)).save(path)
    cells = [np.eye(4, dtype=np.float32)[i] for i in (0, 3)]  # top left, then bottom right
    out = str(tmp_path / "attention.png")
    draw_attention([{"path": path, "tokens": [5, 6], "attention": cells}], (2, 2),
                   [""] * 5 + ["left", "right"], out)
    with Image.open(out) as drawn:
        assert drawn.size == (2 * PANEL, PANEL)
        sheet = np.asarray(drawn.convert("L"), np.float32)
    for word, (row, col) in enumerate([(0, 0), (1, 1)]):
        panel = sheet[:, word * PANEL:(word + 1) * PANEL]
        assert panel[:TITLE].min() < 128  # the word is written in its title strip
        picture = panel[TITLE + 2:PANEL - 2, 2:PANEL - 2]
        half = picture.shape[0] // 2
        quarters = {(r, c): picture[r * half:(r + 1) * half, c * half:(c + 1) * half].mean()
                    for r in (0, 1) for c in (0, 1)}
        assert max(quarters, key=quarters.get) == (row, col), quarters
        # grey 100 under 60% white where it looked, 60% black where it did not
        assert quarters[row, col] > 120 and min(quarters.values()) < 60, quarters


@pytest.mark.setting("predict:beam")
def test_predict_beam_prints_every_beam_best_first(exports, served, tmp_path):
    synthetic_dir = exports[0][0]
    paths = []
    for image_id in TEST_IDS[:2]:
        paths.append(tmp_path / f"{image_id}.jpg")
        paths[-1].write_bytes(image_bytes(synthetic_dir, image_id))
    result = run_module("dist_caption.predict", *map(str, paths), "--beam=3",
                        f"--saved_model={exports[1]['plain']}", timeout=300)
    assert result.returncode == 0, result.stderr
    direct = served.beam_search(
        image_bytes=tf.constant([p.read_bytes() for p in paths]), beam_width=tf.fill([2], 3))
    want = []
    for path, captions, scores in zip(paths, direct["caption"].numpy(),
                                      direct["log_prob"].numpy()):
        want.append(f"{path}:")
        want += [f"  {rank}. {c.decode()}  (log-prob {lp:.2f})"
                 for rank, (c, lp) in enumerate(zip(captions, scores), 1)]
    assert result.stdout.splitlines() == want
    too_wide = run_module("dist_caption.predict", str(paths[0]), "--beam=17",
                          f"--saved_model={exports[1]['plain']}", timeout=300)
    assert_one_line_error(too_wide, "--beam 17 is above the export's limit of 16")


def test_predict_names_the_file_of_a_bad_image(exports, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"shopping list: milk, eggs")
    result = run_module("dist_caption.predict", str(bad),
                        f"--saved_model={os.path.dirname(exports[1]['plain'])}")
    assert_one_line_error(result, f"{bad}: is not a JPEG, PNG, GIF or BMP image")


def test_report_shows_every_image_with_its_scores(exports, served, tmp_path):
    from dist_caption.data import sources
    from dist_caption.data.records import LoadReport
    from dist_caption.metrics import caption_metrics
    from dist_caption.reporting import build_report

    synthetic_dir = exports[0][0]
    records = sources.synthetic_records(synthetic_dir, 40, 0, 64, LoadReport())
    page, metrics = build_report(exports[1]["plain"], records, "test", synthetic_dir)
    captions = served.serving_default(
        image_bytes=tf.constant([image_bytes(synthetic_dir, i) for i in TEST_IDS]))["caption"]
    predictions = {i: c.decode() for i, c in zip(TEST_IDS, captions.numpy())}
    references = {r.image_id: list(r.captions) for r in records if r.split == "test"}
    want = caption_metrics(predictions, references)
    assert {k: metrics[k] for k in want} == pytest.approx(want)
    assert 0 <= metrics["scene_accuracy"] <= 1
    assert page.count("<tr><td data-v=") == len(TEST_IDS)
    for image_id in TEST_IDS:
        assert f"<br>{image_id}</td>" in page
    assert page.count("data:image/jpeg;base64,") == len(TEST_IDS)
    for header in ("BLEU-4", "CIDEr", "scene"):
        assert f">{header}</th>" in page


def _words(out: dict, i: int, beam: int | None = None) -> list[int]:
    """Image i's caption (beam `beam`) as token ids, without its [END]."""
    tokens, length = out["tokens"][i], out["length"][i]
    if beam is not None:
        tokens, length = tokens[beam], length[beam]
    return [int(t) for t in tokens[:int(length)] if t != text.END_ID]


def _repeats(words: list[int], n: int) -> int:
    """How many of the caption's n-grams repeat an earlier one."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams))


def test_decoding_controls_on_tf_servings_loading_path_plain_and_xla(exports):
    """serving_default's optional inputs, run as TF Serving runs them (a Session; a control
    left out takes the SignatureDef default): forced to 20 words the tiny model repeats
    trigrams, `no_repeat_ngram 3` removes every repeat and `repetition_penalty` most repeated
    words; `max_length 3` cuts each caption after its first 3 words; the XLA export gives the
    same tokens; a bad value is one INVALID_ARGUMENT naming it."""
    from serving.local_server import loading

    images = np.array([image_bytes(exports[0][0], i) for i in TEST_IDS], dtype=object)
    outs = {}
    for kind in ("plain", "xla"):
        servable = loading.Servable(0, loading.SavedModelBundle(exports[1][kind]))
        try:
            def run(**controls):
                return servable.predict("serving_default", {"image_bytes": images, **{
                    k: np.array([v], np.float32 if isinstance(v, float) else np.int32)
                    for k, v in controls.items()}})

            outs[kind] = {
                "none": run(), "defaults": run(max_length=0, min_length=0, no_repeat_ngram=0,
                                               repetition_penalty=1.0),
                "long": run(min_length=20), "blocked": run(min_length=20, no_repeat_ngram=3),
                "penalized": run(min_length=20, repetition_penalty=5.0),
                "short": run(max_length=3)}
            for controls, needle in [
                    ({"max_length": -1}, "max_length is [-1]; send one value or one per image, "
                                         "between 0 and 24 words (the model limit)"),
                    ({"repetition_penalty": 0.5}, "repetition_penalty is [0.5]; send one value "
                                                  "or one per image, at least 1"),
                    ({"min_length": 5, "max_length": 3}, "min_length is [5]"),
                    ({"no_repeat_ngram": 25}, "no_repeat_ngram is [25]")]:
                with pytest.raises(loading.ServingError, match=re.escape(needle)) as failed:
                    run(**controls)
                assert failed.value.code.name == "INVALID_ARGUMENT"
                assert "\n" not in failed.value.message
        finally:
            servable.close()
    plain = outs["plain"]
    for name in ("defaults", "long", "blocked", "penalized", "short"):
        np.testing.assert_array_equal(outs["xla"][name]["tokens"], plain[name]["tokens"])
    np.testing.assert_array_equal(plain["defaults"]["tokens"], plain["none"]["tokens"])
    n = len(TEST_IDS)
    assert all(len(_words(plain["long"], i)) >= 20 for i in range(n))
    assert sum(_repeats(_words(plain["long"], i), 3) for i in range(n)) > 0  # something to block
    assert all(len(_words(plain["blocked"], i)) >= 20 for i in range(n))
    assert all(_repeats(_words(plain["blocked"], i), 3) == 0 for i in range(n))
    assert sum(_repeats(_words(plain["penalized"], i), 1) for i in range(n)) < \
        sum(_repeats(_words(plain["long"], i), 1) for i in range(n))
    for i in range(n):
        short, full = _words(plain["short"], i), _words(plain["none"], i)
        assert short == full[:3]
        assert plain["short"]["length"][i] == len(short) + 1  # ended by [END], not cut off


def test_beam_search_takes_the_controls_and_ranks_by_length_penalty(served):
    """beam_search with max_length 2: every beam at most 2 words; length_penalty 1 orders the
    beams by log_prob / length, 0 by log_prob; a negative penalty is refused."""
    images = tf.constant([encode(seed=s) for s in range(3)])
    width = tf.fill([3], 4)
    short = served.beam_search(image_bytes=images, beam_width=width, max_length=tf.constant([2]))
    assert all(len(_words(short, i, b)) <= 2 for i in range(3) for b in range(4))
    for penalty in (0.0, 1.0):
        out = served.beam_search(image_bytes=images, beam_width=width,
                                 length_penalty=tf.constant([penalty]))
        ranked = out["log_prob"].numpy() / np.maximum(out["length"].numpy(), 1) ** penalty
        assert (np.diff(ranked, axis=1) <= 1e-6).all(), ranked
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape("length_penalty is [-1]")):
        served.beam_search(image_bytes=images, beam_width=width,
                           length_penalty=tf.constant([-1.0]))
