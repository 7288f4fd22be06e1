"""Feature extraction -> sharded cache -> tf.data pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, make_records, write_image
from dist_caption.data import backbones, cache, pipeline, text
from dist_caption.data import records as records_lib
from dist_caption.data.records import CaptionRecord, LoadReport
from dist_caption.errors import UserError

PATCHES = cache.ExtractionSettings(dataset="test", backbone="patches", weights="none",
                                   shard_size=3)


def features_by_id(cache_dir: str, split: str) -> dict[str, np.ndarray]:
    out = {}
    for batch in pipeline.image_dataset(cache_dir, split, batch_size=4):
        for image_id, grid in zip(batch["image_id"].numpy(), batch["features"].numpy()):
            out[image_id.decode()] = grid
    return out


def direct_features(model, path: str) -> np.ndarray:
    size = model.input_shape[1]
    image = backbones.decode_image(tf.io.read_file(path), size)
    return model(image[None], training=False).numpy()[0]


def written_shards(monkeypatch) -> list[str]:
    """The names of the shards `cache.extract` (re)writes from now on, in order."""
    names = []
    real = cache._write_shard

    def spy(path, *args, **kwargs):
        names.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache, "_write_shard", spy)
    return names


def read_skipped(cache_dir: str) -> list[dict]:
    """The lines of the cache's skipped-images file, checked against the manifest's sha256."""
    data = tf.io.gfile.GFile(os.path.join(cache_dir, cache.SKIPPED), "rb").read()
    manifest = pipeline.load_manifest(cache_dir)
    assert manifest["skipped"]["file"] == cache.SKIPPED
    assert hashlib.sha256(data).hexdigest() == manifest["skipped"]["sha256"]
    return [json.loads(line) for line in data.decode().splitlines()]


def test_patches_round_trip(storage, records):
    out = f"{storage}/cache"
    manifest = cache.extract(records, out, PATCHES)
    assert manifest["feature_shape"] == [8, 8, 432]
    assert manifest["feature_dtype"] == "float16"
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {
        "train": 6, "val": 2, "test": 2}
    assert [i["file"] for i in manifest["splits"]["train"]["shards"]] == [
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    for info in manifest["splits"]["train"]["shards"]:
        assert cache.sha256_file(os.path.join(out, info["file"])) == info["sha256"]
    assert not [n for n in tf.io.gfile.listdir(out) if ".tmp" in n]

    model = backbones.build_backbone("patches", "none")
    got = features_by_id(out, "train")
    assert sorted(got) == [r.image_id for r in records if r.split == "train"]
    for r in records[:6]:
        assert got[r.image_id].dtype == np.float16
        np.testing.assert_allclose(got[r.image_id], direct_features(model, r.image_path),
                                   atol=2e-3)

    vocab = text.Vocabulary.load(os.path.join(out, cache.VOCAB))
    assert vocab.sha256 == manifest["vocab_sha256"]
    batch = next(iter(pipeline.image_dataset(out, "val", batch_size=2)))
    refs = [[c.decode() for c in row if c] for row in batch["captions"].numpy()]
    by_id = {r.image_id: r for r in records}
    for image_id, row in zip(batch["image_id"].numpy(), refs):
        assert row == [text.standardize_py(c) for c in by_id[image_id.decode()].captions]


def test_vocabulary_comes_from_the_training_split_only(tmp_path, records):
    val_only = dataclasses.replace(records[6], captions=("zebra giraffe",))
    manifest = cache.extract(records[:6] + [val_only] + records[7:], str(tmp_path / "c"),
                             PATCHES)
    vocab = text.Vocabulary.load(str(tmp_path / "c" / cache.VOCAB))
    assert "zebra" not in vocab.tokens and "red" in vocab.tokens
    counts = manifest["train_token_counts"]
    assert counts[text.START_ID] == sum(len(r.captions) for r in records[:6])
    assert counts[vocab.tokens.index("photo")] == 6


def test_caption_dataset_yields_one_padded_row_per_caption(tmp_path, records):
    out = str(tmp_path / "cache")
    cache.extract(records, out, PATCHES)
    ds = pipeline.caption_dataset(out, "train", batch_size=1, max_len=12, shuffle=False,
                                  repeat=False)
    assert ds.element_spec["tokens"].shape.as_list() == [1, 12]
    assert ds.element_spec["features"].shape.as_list() == [1, 8, 8, 432]
    rows = [b["tokens"].numpy()[0] for b in ds]
    vocab = text.Vocabulary.load(os.path.join(out, cache.VOCAB))
    want = sorted(vocab.decode(vocab.encode(c)) for r in records[:6] for c in r.captions)
    assert sorted(vocab.decode(row) for row in rows) == want
    assert all(row[0] == text.START_ID for row in rows)

    short = pipeline.caption_dataset(out, "train", batch_size=1, max_len=5, shuffle=False,
                                     repeat=False)
    assert sum(1 for _ in short) == sum(
        len(vocab.encode(c)) <= 5 for r in records[:6] for c in r.captions)


def test_image_major_batches_hold_k_captions_of_each_image(tmp_path, records):
    """--captions_per_image: each image once per batch, with k of its own captions."""
    out = str(tmp_path / "cache")
    cache.extract(records, out, PATCHES)
    vocab = text.Vocabulary.load(os.path.join(out, cache.VOCAB))
    by_features = {grid.tobytes(): image_id for image_id, grid in
                   features_by_id(out, "train").items()}
    captions = {r.image_id: {vocab.decode(vocab.encode(c)) for c in r.captions}
                for r in records}
    k = 3  # more than the 2 captions of even-numbered images: those repeat one
    ds = pipeline.caption_dataset(out, "train", batch_size=6, max_len=12, seed=1,
                                  captions_per_image=k)
    spec = ds.element_spec
    assert spec["features"].shape.as_list() == [2, 8, 8, 432]
    assert spec["tokens"].shape.as_list() == [6, 12]
    batches = list(ds.take(9))  # 18 image visits: every one of the 6 images three times
    seen = set()
    for b in batches:
        np.testing.assert_array_equal(b["image_index"].numpy(), [0, 0, 0, 1, 1, 1])
        ids = [by_features[g.tobytes()] for g in b["features"].numpy()]
        assert ids[0] != ids[1]
        rows = [vocab.decode(row) for row in b["tokens"].numpy()]
        for row, index in zip(rows, b["image_index"].numpy()):
            assert row in captions[ids[index]]
        for i, image_id in enumerate(ids):
            mine = rows[k * i:k * i + k]
            # Without replacement while the image has captions left.
            assert len(set(mine)) == min(k, len(captions[image_id]))
            seen.update(mine)
    assert seen == set().union(*(captions[r.image_id] for r in records if r.split == "train"))

    again = pipeline.caption_dataset(out, "train", batch_size=6, max_len=12, seed=1,
                                     captions_per_image=k)
    for b, c in zip(batches, again.take(9)):  # a resumed run sees the same batches
        np.testing.assert_array_equal(b["tokens"].numpy(), c["tokens"].numpy())
    with pytest.raises(UserError, match="captions_per_image"):
        pipeline.caption_dataset(out, "train", batch_size=4, max_len=12, captions_per_image=3)


def test_shuffled_order_is_reproducible_for_a_seed(tmp_path, records):
    out = str(tmp_path / "cache")
    cache.extract(records, out, PATCHES)

    def first(seed):
        ds = pipeline.caption_dataset(out, "train", batch_size=4, max_len=12, seed=seed)
        return np.concatenate([b["tokens"].numpy() for b in ds.take(6)])

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))


@pytest.mark.parametrize("shard_size", [2, 100])
def test_two_workers_read_disjoint_and_complete_parts(tmp_path, records, shard_size):
    out = str(tmp_path / "cache")
    cache.extract(records, out, dataclasses.replace(PATCHES, shard_size=shard_size))
    seen = []
    captions = 0
    for worker in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                         num_replicas_in_sync=2)
        seen.append({i.decode() for b in pipeline.image_dataset(out, "train", 4, ctx)
                     for i in b["image_id"].numpy()})
        captions += sum(1 for _ in pipeline.caption_dataset(
            out, "train", 1, 12, ctx, shuffle=False, repeat=False))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {r.image_id for r in records if r.split == "train"}
    assert seen[0] and seen[1]
    assert captions == sum(len(r.captions) for r in records if r.split == "train")


@pytest.mark.slow
def test_keras_backbone_round_trip_and_resume_reuses_its_weights(tmp_path, records):
    settings = cache.ExtractionSettings(dataset="test", backbone="mobilenet_v3_small",
                                        weights="none", shard_size=4)
    out = str(tmp_path / "cache")
    manifest = cache.extract(records, out, settings, batch_size=4)
    assert manifest["feature_shape"] == [7, 7, 576] and manifest["input_size"] == 224
    model = backbones.build_backbone("mobilenet_v3_small", "none")
    model.load_weights(os.path.join(out, cache.BACKBONE_WEIGHTS))
    got = features_by_id(out, "test")
    for r in records[8:]:
        np.testing.assert_allclose(got[r.image_id].astype(np.float32),
                                   direct_features(model, r.image_path), rtol=2e-2, atol=2e-2)
    # Random ("none") weights differ per build: a re-run must reuse the stored ones.
    os.remove(os.path.join(out, "test-00000-of-00001.tfrecord"))
    cache.extract(records, out, settings, batch_size=4)
    again = features_by_id(out, "test")
    for image_id, grid in got.items():
        np.testing.assert_array_equal(again[image_id], grid)


@pytest.mark.slow
def test_local_weights_file_is_used(tmp_path, records):
    donor = backbones.build_backbone("mobilenet_v3_small", "none")
    base = donor.layers[-1]
    path = str(tmp_path / "mnv3.weights.h5")
    base.save_weights(path)
    settings = cache.ExtractionSettings(dataset="test", backbone="mobilenet_v3_small",
                                        weights=path, shard_size=8)
    out = str(tmp_path / "cache")
    cache.extract(records, out, settings)
    got = features_by_id(out, "test")
    for r in records[8:]:
        np.testing.assert_allclose(got[r.image_id].astype(np.float32),
                                   direct_features(donor, r.image_path), rtol=2e-2, atol=2e-2)


def test_imagenet_weights_offline_fail_with_a_hint():
    with pytest.raises(UserError, match=r"--weights /path/to"):
        backbones.build_backbone("mobilenet_v3_small", "imagenet")


def test_missing_and_unreadable_images_are_skipped_with_reasons(tmp_path, records):
    bad = str(tmp_path / "bad.jpg")
    with open(bad, "wb") as f:
        f.write(b"not an image at all")
    truncated = str(tmp_path / "trunc.jpg")
    write_image(truncated, (64, 64), seed=9)
    with open(truncated, "r+b") as f:
        f.truncate(300)
    extra = [CaptionRecord("bad", bad, ("a cat",), "train"),
             CaptionRecord("trunc", truncated, ("a dog",), "train"),
             CaptionRecord("gone", str(tmp_path / "gone.jpg"), ("a cow",), "train")]
    manifest = cache.extract(records + extra, str(tmp_path / "cache"), PATCHES)
    skipped = {s["image_id"]: s for s in read_skipped(str(tmp_path / "cache"))}
    assert set(skipped) == {"bad", "trunc", "gone"}
    assert {s["reason"] for s in skipped.values()} == {cache.UNREADABLE}
    assert {s["split"] for s in skipped.values()} == {"train"}
    assert "no such file" in skipped["gone"]["detail"] and str(tmp_path / "gone.jpg") in skipped[
        "gone"]["detail"]
    # What is wrong with the file and what to do, in plain words; no TensorFlow internals.
    assert skipped["bad"]["detail"].endswith(
        "not a readable JPEG, PNG, GIF or BMP (it starts with b'not an i'): replace or delete "
        "the file")
    assert skipped["trunc"]["detail"].endswith(
        "a JPEG file that does not decode (truncated or corrupt; TensorFlow's message is in the "
        "log): replace or delete the file")
    for name in ("bad", "trunc"):
        detail = skipped[name]["detail"]
        assert "{{" not in detail and "function_node" not in detail and "Error" not in detail
    assert manifest["skipped"]["by_reason"] == {cache.UNREADABLE: 3}
    assert manifest["splits"]["train"]["images"] == 6


def test_settings_mismatch_and_foreign_folders_are_refused(storage, records):
    out = f"{storage}/cache"
    cache.extract(records, out, PATCHES)
    with pytest.raises(UserError,
                       match=r"other settings \(feature_dtype was float16, now float32\).*--overwrite"):
        cache.extract(records, out, dataclasses.replace(PATCHES, feature_dtype="float32"))
    manifest = cache.extract(records, out, dataclasses.replace(PATCHES, feature_dtype="float32"),
                             overwrite=True)
    assert manifest["feature_dtype"] == "float32"
    foreign = f"{storage}/photos"
    tf.io.gfile.makedirs(foreign)
    tf.io.gfile.GFile(f"{foreign}/holiday.jpg", "wb").write(b"x")
    with pytest.raises(UserError, match="not a feature cache"):
        cache.extract(records, foreign, PATCHES)
    assert tf.io.gfile.GFile(f"{foreign}/holiday.jpg", "rb").read() == b"x"


def test_pipeline_checks_the_cache(tmp_path, records):
    out = str(tmp_path / "cache")
    with pytest.raises(UserError, match="no finished feature cache.*extract_features"):
        pipeline.load_manifest(out)
    manifest = cache.extract(records, out, PATCHES)
    with pytest.raises(UserError, match=r"feature_shape=\[8, 8, 432\] but \[7, 7, 576\]"):
        pipeline.check_compatible(manifest, {"feature_shape": [7, 7, 576]}, out)
    with pytest.raises(UserError, match="vocab_sha256"):
        pipeline.check_compatible(manifest, {"vocab_sha256": "0" * 64}, out)
    pipeline.check_compatible(manifest, {"feature_shape": (8, 8, 432),
                                         "vocab_sha256": manifest["vocab_sha256"]}, out)
    with pytest.raises(UserError, match="no 'dev' split"):
        pipeline.caption_dataset(out, "dev", 2, 12)


def test_corrupt_shard_is_detected_and_rebuilt_alone(storage, records, monkeypatch):
    out = f"{storage}/cache"
    manifest = cache.extract(records, out, PATCHES)
    shards = [os.path.join(out, i["file"]) for i in manifest["splits"]["train"]["shards"]]
    data = bytearray(tf.io.gfile.GFile(shards[1], "rb").read())
    data[100] ^= 0xFF
    tf.io.gfile.GFile(shards[1], "wb").write(bytes(data))
    with pytest.raises(UserError, match=f"shard {shards[1]} is corrupt"):
        pipeline.caption_dataset(out, "train", 2, 12, verify=True)
    rewritten = written_shards(monkeypatch)
    cache.extract(records, out, PATCHES)
    assert rewritten == ["train-00001-of-00002.tfrecord"]
    pipeline.split_files(out, pipeline.load_manifest(out), "train", verify=True)


def test_a_finished_cache_is_only_read_so_runs_sharing_it_can_start_together(tmp_path,
                                                                             records):
    """Every launch prepares its data: on a finished cache that must write nothing, and leave
    another run's temporary files alone (two launches at once failed: one removed the other's
    `.extraction.json.tmp<pid>` before it was renamed)."""
    out = str(tmp_path / "cache")
    records, report, _ = with_missing_images(records, tmp_path, (("train", 5),))
    manifest = cache.extract(records, out, PATCHES, report)
    other_run = os.path.join(out, f".{cache.SETTINGS}.tmp99999")
    open(other_run, "w").write("{}")
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    assert cache.SKIPPED in before
    time.sleep(0.01)
    assert cache.extract(records, out, PATCHES, report) == manifest
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == before


def with_missing_images(records, tmp_path, counts=(("train", 700), ("val", 200), ("test", 100))):
    """`records` as a loader returns them when the source also lists images without a file:
    (records kept, report of the missing ones, ids of the missing ones in order)."""
    ghosts = [CaptionRecord(f"dead-{split}-{i:04d}", str(tmp_path / f"dead-{split}-{i}.jpg"),
                            ("a photo that never arrived",), split)
              for split, n in counts for i in range(n)]
    report = LoadReport()
    kept = records_lib.finalize([*records, *ghosts], report)
    assert kept == records
    return kept, report, [g.image_id for g in ghosts]


def test_thousands_of_missing_images_are_counted_in_the_manifest_and_listed_beside_it(
        storage, records, tmp_path, monkeypatch):
    """A web dataset misses hundreds of thousands of images: the manifest every training
    worker reads keeps their number and a few, `skipped.jsonl` beside it lists them all; it is
    written before the manifest, and a re-run of the finished cache writes neither."""
    out = f"{storage}/cache"
    bad = str(tmp_path / "bad.jpg")
    with open(bad, "wb") as f:
        f.write(b"not an image at all")
    kept, report, dead = with_missing_images(records, tmp_path)
    kept = [*kept, CaptionRecord("bad", bad, ("a cat",), "val")]
    writes = []
    for name in ("write_lines_atomic", "write_json_atomic"):
        real = getattr(cache, name)
        monkeypatch.setattr(cache, name, lambda path, data, real=real: (
            writes.append(os.path.basename(path)), real(path, data))[1])
    manifest = cache.extract(kept, out, PATCHES, report)
    assert writes[-2:] == [cache.SKIPPED, cache.MANIFEST]

    skipped = manifest["skipped"]
    assert skipped["images"] == 1001
    assert skipped["by_reason"] == {records_lib.MISSING_FILE: 1000, cache.UNREADABLE: 1}
    assert skipped["by_split"] == {"train": 700, "val": 201, "test": 100}
    assert manifest["load_report"]["missing_images"] == 1000
    lines = read_skipped(out)
    assert len(lines) == 1001
    assert [l["image_id"] for l in lines if l["reason"] == records_lib.MISSING_FILE] == dead
    assert lines[0] == {"image_id": dead[0], "split": "train", "reason": "missing_file",
                        "detail": f"missing file {tmp_path / 'dead-train-0.jpg'}"}
    assert lines[-1]["image_id"] == "bad" and lines[-1]["split"] == "val"
    # The sample: the first few of each reason, as the file has them.
    assert len(skipped["sample"]) <= records_lib.SAMPLE_SIZE
    assert skipped["sample"] == lines[:cache.SAMPLE_PER_REASON] + lines[-1:]
    assert pipeline.load_manifest(out) == manifest
    # Listing the 1,000 in it made ~100 KB; with none skipped it is ~2 KB, here ~3 KB.
    size = tf.io.gfile.stat(f"{out}/{cache.MANIFEST}").length
    assert size < 6_000, size

    writes.clear()
    assert cache.extract(kept, out, PATCHES, report) == manifest
    assert writes == []


def test_a_cache_without_skipped_images_has_an_empty_list_of_them(storage, records):
    out = f"{storage}/cache"
    manifest = cache.extract(records, out, PATCHES)
    assert read_skipped(out) == []
    assert manifest["skipped"] == {"file": cache.SKIPPED, "sha256": hashlib.sha256().hexdigest(),
                                   "images": 0, "by_reason": {}, "by_split": {}, "sample": []}
    assert cache.skipped_count(manifest) == 0


def test_a_manifest_that_listed_every_skipped_image_is_read_and_rewritten_once(
        tmp_path, records):
    """Caches written before `skipped.jsonl` listed every skipped image in the manifest: they
    are still read, and the next extraction with the same settings rewrites the manifest in
    the new form (then a re-run writes nothing again)."""
    out = str(tmp_path / "cache")
    kept, report, _ = with_missing_images(records, tmp_path, (("train", 30),))
    new = cache.extract(kept, out, PATCHES, report)
    old = {k: v for k, v in new.items() if k != "skipped"}
    old["skipped_images"] = [{"image_id": "x", "path": "/x.jpg", "reason": "NotFoundError: x",
                              "split": "train"}]
    old["load_report"] = {k: v for k, v in dataclasses.asdict(report).items() if k != "splits"}
    old = json.loads(json.dumps(old))
    with open(os.path.join(out, cache.MANIFEST), "w") as f:
        json.dump(old, f)
    os.remove(os.path.join(out, cache.SKIPPED))

    assert pipeline.load_manifest(out) == old
    assert cache.skipped_count(old) == 1
    assert cache.extract(kept, out, PATCHES, report) == new
    assert pipeline.load_manifest(out) == new
    assert len(read_skipped(out)) == 30
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    time.sleep(0.01)
    cache.extract(kept, out, PATCHES, report)
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == before


def test_a_failed_extraction_keeps_its_finished_shards_and_the_next_run_finishes(
        storage, records, monkeypatch):
    """The same code on a local folder and on ram:// (tf.io.gfile, like gs://): a shard is
    visible only once complete, the manifest only once every shard is, and a re-run rewrites
    only what was not finished."""
    out = f"{storage}/cache"
    real_example, calls = cache._example, []

    def dies_in_the_second_shard(*args):
        calls.append(1)
        if len(calls) == 5:  # shard_size 3: the second record of train-00001
            raise KeyboardInterrupt
        return real_example(*args)

    monkeypatch.setattr(cache, "_example", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        cache.extract(records, out, PATCHES)
    assert sorted(n for n in tf.io.gfile.listdir(out) if not n.startswith(".")) == [
        cache.BACKBONE_WEIGHTS, cache.SETTINGS, "train-00000-of-00002.tfrecord",
        "train-00000-of-00002.tfrecord.json", cache.VOCAB]
    # What a killed process (no clean-up) leaves: a hidden partial file, cleared by the re-run.
    tf.io.gfile.GFile(f"{out}/.train-00001-of-00002.tfrecord.tmp99999", "wb").write(b"partial")

    monkeypatch.setattr(cache, "_example", real_example)
    rewritten = written_shards(monkeypatch)
    manifest = cache.extract(records, out, PATCHES)
    assert rewritten == ["train-00001-of-00002.tfrecord", "val-00000-of-00001.tfrecord",
                         "test-00000-of-00001.tfrecord"]
    assert manifest["splits"]["train"]["images"] == 6
    assert len(features_by_id(out, "train")) == 6
    assert not [n for n in tf.io.gfile.listdir(out) if ".tmp" in n]


@pytest.mark.slow
def test_interrupted_extraction_resumes_keeping_finished_shards(tmp_path):
    records = make_records(str(tmp_path / "images"), (("train", 48), ("test", 4)), (64, 48))
    spec = tmp_path / "records.json"
    spec.write_text(json.dumps([dataclasses.astuple(r) for r in records]))
    out = str(tmp_path / "cache")
    script = (
        "import json, sys\n"
        "from dist_caption.data import cache\n"
        "from dist_caption.data.records import CaptionRecord\n"
        "recs = [CaptionRecord(i, p, tuple(c), s) for i, p, c, s in json.load(open(sys.argv[1]))]\n"
        "cache.extract(recs, sys.argv[2], cache.ExtractionSettings('test', 'mobilenet_v3_small',"
        " 'none', shard_size=4), batch_size=4)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(spec), out], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A shard is finished once its sidecar is written (after the rename): killed in between,
    # the shard is rightly redone, so wait for the sidecar and keep only shards that have one.
    first = os.path.join(out, "train-00000-of-00012.tfrecord.json")
    deadline = time.time() + 120
    while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(first), "the extraction never finished its first shard"
    assert not os.path.exists(os.path.join(out, cache.MANIFEST)), "it was not interrupted"
    kept = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)
            if n.endswith(".tfrecord") and os.path.exists(os.path.join(out, f"{n}.json"))}
    assert kept

    manifest = cache.extract(records, out, cache.ExtractionSettings(
        "test", "mobilenet_v3_small", "none", shard_size=4), batch_size=4)
    for name, mtime in kept.items():
        assert os.stat(os.path.join(out, name)).st_mtime_ns == mtime
    assert manifest["splits"]["train"]["images"] == 48
    assert len(features_by_id(out, "train")) == 48
    assert not [n for n in os.listdir(out) if ".tmp" in n]


# ------------------------------------------------------------------ extraction split over tasks

def extraction(synthetic_dir: str, cache_dir: str, *args: str, backbone: str = "patches"):
    """`python -m dist_caption.extract_features` on the synthetic dataset, started (Popen)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TF_NUM_INTRAOP_THREADS": "1",
           "TF_NUM_INTEROP_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dist_caption.extract_features", f"--synthetic_dir={synthetic_dir}",
         "--num_images=48", "--image_size=64", f"--cache_dir={cache_dir}", "--shard_size=4",
         "--extract_batch_size=4", f"--backbone={backbone}", "--weights=none", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    """Waits for `proc`, asserts it succeeded, returns its stderr."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


@pytest.fixture
def synthetic48(tmp_path):
    from dist_caption.data import sources
    from dist_caption.data.records import LoadReport

    folder = str(tmp_path / "synthetic")
    sources.synthetic_records(folder, 48, 0, 64, LoadReport())
    return folder


@pytest.mark.slow
def test_only_task_zero_generates_the_synthetic_dataset(tmp_path):
    folder, cache_dir = str(tmp_path / "synthetic"), str(tmp_path / "cache")
    later = extraction(folder, cache_dir, "--task_index=1", "--num_tasks=2")  # waits for task 0
    first = extraction(folder, cache_dir, "--task_index=0", "--num_tasks=2")
    logs = [finish(p) for p in (first, later)]
    assert "generating the synthetic dataset" in logs[0]
    assert "generating the synthetic dataset" not in logs[1]
    assert pipeline.load_manifest(cache_dir)["splits"]["train"]["images"] > 0


@pytest.mark.setting("task_index", "num_tasks")
@pytest.mark.slow
def test_two_processes_split_the_shards_and_build_the_same_cache_as_one(tmp_path, synthetic48):
    alone = str(tmp_path / "alone")
    finish(extraction(synthetic48, alone))
    shared = str(tmp_path / "shared")
    procs = [extraction(synthetic48, shared, f"--task_index={i}", "--num_tasks=2")
             for i in range(2)]
    logs = [finish(p) for p in procs]
    one, two = (pipeline.load_manifest(d) for d in (alone, shared))
    def without_sha256(splits):  # a proto map's byte order differs from process to process
        return {s: [{k: v for k, v in i.items() if k != "sha256"} for i in v["shards"]]
                for s, v in splits.items()}

    assert without_sha256(two["splits"]) == without_sha256(one["splits"])
    assert two["vocab_sha256"] == one["vocab_sha256"]
    for split in one["splits"]:
        a, b = features_by_id(alone, split), features_by_id(shared, split)
        assert sorted(a) == sorted(b)
        for image_id in a:
            np.testing.assert_array_equal(a[image_id], b[image_id])
    shards = [n for n in os.listdir(shared) if n.endswith(".tfrecord")]
    assert len(shards) == sum(len(v["shards"]) for v in one["splits"].values())
    for i, log in enumerate(logs):  # each task extracted its half of the images, no more
        done = re.findall(rf"extract patches \(task {i} of 2\) (\d+)/(\d+)", log)[-1]
        assert done[0] == done[1]
        assert abs(int(done[0]) - 24) <= 4, done
    assert sum(int(re.findall(rf"\(task {i} of 2\) (\d+)/", log)[-1]) for i, log in
               enumerate(logs)) == 48
    assert not [n for n in os.listdir(shared) if ".tmp" in n]


@pytest.mark.slow
def test_a_killed_task_loses_only_its_unfinished_shard(tmp_path, synthetic48):
    out = str(tmp_path / "cache")
    args = ("--num_tasks=2",)
    first = extraction(synthetic48, out, "--task_index=0", *args, backbone="mobilenet_v3_small")
    second = extraction(synthetic48, out, "--task_index=1", *args,
                        backbone="mobilenet_v3_small")
    sidecar = os.path.join(out, "train-00001-of-00010.tfrecord.json")  # task 1's first shard
    deadline = time.time() + 150
    while not os.path.exists(sidecar) and time.time() < deadline and second.poll() is None:
        time.sleep(0.005)
    second.kill()
    second.communicate()
    assert os.path.exists(sidecar), "task 1 never finished its first shard"
    kept = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)
            if n.endswith(".tfrecord") and int(n.split("-")[1]) % 2 == 1}
    assert first.poll() is None, "task 0 did not wait for task 1's shards"
    assert not os.path.exists(os.path.join(out, cache.MANIFEST))

    finish(extraction(synthetic48, out, "--task_index=1", *args,
                      backbone="mobilenet_v3_small"))
    finish(first)
    for name, mtime in kept.items():
        assert os.stat(os.path.join(out, name)).st_mtime_ns == mtime, f"{name} was rewritten"
    manifest = pipeline.load_manifest(out)
    assert sum(v["images"] for v in manifest["splits"].values()) == 48
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    # Both tasks ran the backbone task 0 saved (random weights differ per build).
    model = cache.load_backbone(out, "mobilenet_v3_small")
    got = features_by_id(out, "train")
    for image_id in ("000000002", "000000006"):  # in train-00000 (task 0), train-00001 (task 1)
        path = os.path.join(synthetic48, "images", f"{image_id}.jpg")
        np.testing.assert_allclose(got[str(int(image_id))].astype(np.float32),
                                   direct_features(model, path), rtol=2e-2, atol=2e-2)


def test_a_task_that_waits_too_long_says_which_task_is_missing(storage, records, monkeypatch):
    monkeypatch.setattr(cache, "POLL_SECONDS", 0.05)
    out = f"{storage}/cache"
    with pytest.raises(UserError, match=r"extraction task 1 of 2: task 0 has not prepared .* "
                                        r"after 0s: start every task \(--task_index 0\.\.N-1"):
        cache.extract(records, out, PATCHES, task=cache.Task(1, 2), wait_timeout=0.2)
    with pytest.raises(UserError, match=r"extraction task 0 of 2: 2 shards of the other tasks "
                                        r"are unfinished \(train-00001-of-00002.tfrecord of task "
                                        r"1, \.\.\.\) after 0s.*finished shards are kept"):
        cache.extract(records, out, PATCHES, task=cache.Task(0, 2), wait_timeout=0.2)
    with pytest.raises(UserError, match=r"extraction task 1 of 2: its shards are done but task "
                                        r"0 has not written .*manifest.json after 0s"):
        cache.extract(records, out, PATCHES, task=cache.Task(1, 2), wait_timeout=0.2)
    rewritten = written_shards(monkeypatch)
    manifest = cache.extract(records, out, PATCHES, task=cache.Task(0, 2))
    assert rewritten == []  # its own shards were kept from its first, failed run
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {
        "train": 6, "val": 2, "test": 2}
    assert cache.extract(records, out, PATCHES, task=cache.Task(1, 2)) == manifest


def test_a_process_finds_its_extraction_task_in_flags_tf_config_or_the_job_index():
    from dist_caption.cluster import task_of

    cluster = json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
                          "task": {"type": "worker", "index": 1}})
    assert task_of({}) == cache.Task(0, 1)
    assert task_of({"TF_CONFIG": cluster}) == cache.Task(2, 3)
    assert task_of({"TF_CONFIG": cluster}, 0, 4) == cache.Task(0, 4)  # the flags win
    assert task_of({"JOB_COMPLETION_INDEX": "3", "DIST_CAPTION_WORKERS": "4"}) == \
        cache.Task(3, 4)
    with pytest.raises(UserError, match="DIST_CAPTION_WORKERS is not set: set it to the Job's"):
        task_of({"JOB_COMPLETION_INDEX": "3"})
    with pytest.raises(UserError, match="JOB_COMPLETION_INDEX=4 is not below "
                                        "DIST_CAPTION_WORKERS=4"):  # checked as the pod's
        task_of({"JOB_COMPLETION_INDEX": "4", "DIST_CAPTION_WORKERS": "4"})
    with pytest.raises(UserError, match=r"task 4 of 4 \(from --task_index/--num_tasks\): the "
                                        r"index must be below"):
        task_of({}, 4, 4)
    evaluator = json.dumps({"cluster": {"worker": ["b:1"]}, "task": {"type": "evaluator"}})
    with pytest.raises(UserError, match="'evaluator' extracts nothing"):
        task_of({"TF_CONFIG": evaluator})
