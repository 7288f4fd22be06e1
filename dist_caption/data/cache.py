"""The sharded feature cache: a frozen backbone run once over every image.

Layout of a cache folder:

    manifest.json               what is in the cache (written last: its presence means complete)
    skipped.jsonl               every image left out and why, one JSON object a line (the
                                manifest has the counts and a sample, `skipped_summary`)
    extraction.json             the settings the cache is built with (checked on every re-run)
    vocab.txt                   the vocabulary, one token per line (line number = id)
    backbone.weights.h5         the backbone's weights, so export rebuilds the exact backbone
    backbone_preset/            instead, for a keras_hub backbone (vit, clip, siglip): its
                                encoder and image converter as a keras_hub preset
    train-00000-of-00004.tfrecord, train-00000-of-00004.tfrecord.json, ...

Each TFRecord holds one `tf.train.Example` per image (see `FEATURE_SPEC`): the feature grid as
raw bytes (float16 by default), and every caption of the image, standardised and tokenised.
A shard is written under a temporary name and renamed only when complete, then its sidecar
`.json` (record counts, sha256, skipped images) is written: a shard with an intact sidecar is
finished, so an interrupted extraction resumes by keeping the finished shards and redoing the
rest. Every file goes through `tf.io.gfile` (`dist_caption.files`), so `cache_dir` may be on an
object store (gs://, s3://): there a rename is a server-side copy that creates the final object
whole, so a shard still appears complete or not at all, and readers only use the shards the
manifest lists.

Extraction may be split over N processes (`Task`, see `extract`): they take disjoint shards;
task 0 prepares the folder first and writes the manifest last, once every sidecar is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from dist_caption.data import backbones, text
from dist_caption.data.records import SAMPLE_SIZE, SPLITS, CaptionRecord, LoadReport
from dist_caption.errors import UserError
from dist_caption import config, files
from dist_caption.cluster import Task
from dist_caption.files import atomic_path, read_json, write_json_atomic, write_lines_atomic
from dist_caption.progress import Progress
from dist_caption.tracing import traced

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = "extraction.json"
VOCAB = "vocab.txt"
SKIPPED = "skipped.jsonl"
UNREADABLE = "unreadable"  # the reason of an image whose file the extraction could not decode
SAMPLE_PER_REASON = 5  # skipped images the manifest shows of each reason
BACKBONE_WEIGHTS = "backbone.weights.h5"
BACKBONE_PRESET = "backbone_preset"
FEATURE_DTYPES = config.FEATURE_DTYPES
# Everything that decides the bytes of a cache (declared with the flags, in config.py).
ExtractionSettings = config.ExtractionSettings

FEATURE_SPEC = {
    "image_id": tf.io.FixedLenFeature([], tf.string),
    "image_path": tf.io.FixedLenFeature([], tf.string),
    "features": tf.io.FixedLenFeature([], tf.string),
    "captions": tf.io.VarLenFeature(tf.string),
    "tokens": tf.io.VarLenFeature(tf.int64),
    "caption_lengths": tf.io.VarLenFeature(tf.int64),
}


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def shard_file(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def records_fingerprint(records: Sequence[CaptionRecord]) -> str:
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.image_id, r.image_path, r.captions, r.split]).encode())
    return digest.hexdigest()


def plan_shards(records: Sequence[CaptionRecord],
                shard_size: int) -> dict[str, list[list[CaptionRecord]]]:
    """Records of each split, in order, cut into shards of `shard_size` images."""
    plan = {}
    for split in SPLITS:
        items = [r for r in records if r.split == split]
        if items:
            plan[split] = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    return plan


def _example(record: CaptionRecord, features: np.ndarray, vocab: text.Vocabulary) -> bytes:
    captions = [text.standardize_py(c) for c in record.captions]
    tokens = [vocab.encode(c) for c in captions]

    def feature(**kind):
        return tf.train.Feature(**kind)

    return tf.train.Example(features=tf.train.Features(feature={
        "image_id": feature(bytes_list=tf.train.BytesList(value=[record.image_id.encode()])),
        "image_path": feature(bytes_list=tf.train.BytesList(
            value=[record.image_path.encode()])),
        "features": feature(bytes_list=tf.train.BytesList(value=[features.tobytes()])),
        "captions": feature(bytes_list=tf.train.BytesList(value=[c.encode() for c in captions])),
        "tokens": feature(int64_list=tf.train.Int64List(value=[t for c in tokens for t in c])),
        "caption_lengths": feature(int64_list=tf.train.Int64List(value=[len(c) for c in tokens])),
    })).SerializeToString()


# The formats tf.io.decode_image reads, by their first bytes.
IMAGE_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"),
                    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"))


def _failure_reason(path: str, size: int) -> str:
    """Why `path` could not be turned into an image, in plain words, as one line: what the file
    is and what to do. TensorFlow's own message goes to the log (INFO) only.

        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
        ...     _ = f.write(b"<html>404 Not Found</html>"); f.flush()
        ...     _failure_reason(f.name, 96)
        'not a readable JPEG, PNG, GIF or BMP (an HTML page): replace or delete the file'
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(64)
    except tf.errors.NotFoundError:
        return "no such file"
    except tf.errors.OpError:
        return "could not be read (permissions?): make it readable, or delete it"
    kind = next((name for magic, name in IMAGE_SIGNATURES if head.startswith(magic)), None)
    if kind is None:
        what = ("an empty file" if not head else
                "an HTML page" if head.lstrip()[:1] == b"<" else
                f"it starts with {head[:8]!r}")
        return f"not a readable JPEG, PNG, GIF or BMP ({what}): replace or delete the file"
    try:
        backbones.decode_image(tf.io.read_file(path), size)
    except (tf.errors.OpError, ValueError) as e:
        logging.info("decoding %s: %s", path, getattr(e, "message", str(e)))
        return (f"a {kind} file that does not decode (truncated or corrupt; TensorFlow's "
                f"message is in the log): replace or delete the file")
    return "could not be read"


def _features(records: Sequence[CaptionRecord], model: Callable, size: int,
              batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, feature grid) for every record whose image decodes, in order."""
    paths = [r.image_path for r in records]
    images = tf.data.Dataset.from_tensor_slices((tf.range(len(paths)), paths)).map(
        lambda i, p: (i, backbones.decode_image(tf.io.read_file(p), size)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images = images.ignore_errors().batch(batch_size).prefetch(2)
    for indices, batch in images:
        grid = model(batch, training=False).numpy()
        yield from zip(indices.numpy().tolist(), grid)


POLL_SECONDS = 1.0


def extract(records: Sequence[CaptionRecord], cache_dir: str, settings: ExtractionSettings,
            report: LoadReport | None = None, batch_size: int = 32,
            overwrite: bool = False, source: dict | None = None, task: Task = Task(),
            wait_timeout: float = 3600) -> dict:
    """Builds (or finishes) the cache in `cache_dir` and returns its manifest.

    `source` is stored in the manifest as is (e.g. the synthetic dataset's folder, where
    evaluation finds the scenes to score captions against). Every image skipped (by the loader,
    as `report` says, or because it does not decode) is listed in `SKIPPED`, written just
    before the manifest; the manifest keeps only their counts and a sample (`skipped_summary`),
    so its size does not grow with a web dataset's dead URLs.

    With `task.count` > 1, that many processes (same records, same settings) build the cache
    together: task 0 checks or clears the folder and writes the settings, the vocabulary and
    the backbone weights, which the others wait for; each then writes its own shards; task 0
    waits for every shard's sidecar and writes the manifest, which the others wait for. Each
    wait gives up after `wait_timeout` seconds with a UserError; finished shards are kept.
    """
    if not records:
        raise UserError("the dataset has no usable images: nothing to extract "
                        "(see the warnings above for what was skipped)")
    train_captions = [c for r in records if r.split == "train" for c in r.captions]
    if not train_captions:
        raise UserError("the dataset has no training split: the vocabulary is built from "
                        "training captions only")
    vocab = text.Vocabulary.build(train_captions, settings.vocab_size, settings.min_count)
    spec = backbones.get_spec(settings.backbone)
    # A wrong --weights or --class_token is refused before the folder is claimed.
    backbones.check_class_token(settings.backbone, settings.class_token)
    if spec.presets and not files.exists(_stored_backbone(cache_dir, settings.backbone)):
        backbones.check_preset(settings.backbone, settings.weights, settings.class_token)
    fingerprint = {**_settings_of(settings), "format": FORMAT_VERSION,
                   "records_sha256": records_fingerprint(records),
                   "vocab_sha256": vocab.sha256}
    who = f"extraction task {task.index} of {task.count}"
    manifest_path = os.path.join(cache_dir, MANIFEST)
    # A finished cache with these settings is only read (each shard's checksum), so runs that
    # share it can start at the same time; a corrupt shard is still rebuilt below.
    existing = read_json(manifest_path) if files.exists(manifest_path) else None
    finished = existing is not None and _same(existing, fingerprint)
    if task.index == 0:
        files.makedirs(cache_dir)
        if not finished:
            _claim(cache_dir, fingerprint, overwrite, alone=task.count == 1)
            vocab.save(os.path.join(cache_dir, VOCAB))
        model = _backbone(cache_dir, settings)
    else:
        _wait(lambda: _prepared(cache_dir, fingerprint), wait_timeout,
              f"{who}: task 0 has not prepared {cache_dir} (settings, vocabulary, backbone "
              "weights)")
        model = load_backbone(cache_dir, settings.backbone)
    run = traced(model, reduce_retracing=True)
    size = int(model.input_shape[1])  # a preset's own image size, else the spec's
    feature_shape = [int(d) for d in model.output_shape[1:]]
    plan = [(split, shard_file(split, i, len(shards)), shard)
            for split, shards in plan_shards(records, settings.shard_size).items()
            for i, shard in enumerate(shards)]
    mine = plan[task.index::task.count]
    progress = Progress(f"extract {settings.backbone}"
                        + (f" (task {task.index} of {task.count})" if task.count > 1 else ""),
                        total=sum(len(shard) for _, _, shard in mine), unit="images")
    for _, name, shard in mine:
        path = os.path.join(cache_dir, name)
        if _finished_shard(path):
            progress.total -= len(shard)
        else:
            _write_shard(path, shard, run, size, batch_size, settings.feature_dtype,
                         vocab, progress)
    progress.close()
    if task.index != 0:
        _wait(lambda: files.exists(manifest_path) and _same(read_json(manifest_path),
                                                            fingerprint), wait_timeout,
              f"{who}: its shards are done but task 0 has not written {manifest_path}")
        return read_json(manifest_path)

    owner = {name: k % task.count for k, (_, name, _) in enumerate(plan)}
    pending = list(owner)  # a sidecar is written once its shard is complete: looked for once

    def all_finished() -> bool:
        pending[:] = [n for n in pending
                      if not files.exists(os.path.join(cache_dir, f"{n}.json"))]
        return not pending

    _wait(all_finished, wait_timeout,
          lambda: f"{who}: {len(pending)} shards of the other tasks are unfinished "
                  f"({pending[0]} of task {owner[pending[0]]}, ...)")
    splits = {}
    skipped = report.skipped() if report else []
    for split, name, _ in plan:
        info = read_json(os.path.join(cache_dir, f"{name}.json"))
        skipped += [{"image_id": s["image_id"], "split": split, "reason": UNREADABLE,
                     "detail": f"{s['path']}: {s['reason']}"} for s in info.pop("skipped")]
        splits.setdefault(split, {"images": 0, "captions": 0, "shards": []})
        splits[split]["images"] += info["images"]
        splits[split]["captions"] += info["captions"]
        splits[split]["shards"].append(info)

    skipped_lines = [json.dumps(entry, ensure_ascii=False).encode() + b"\n"
                     for entry in skipped]
    skipped_sha256 = hashlib.sha256()
    for line in skipped_lines:
        skipped_sha256.update(line)
    counts = np.zeros(len(vocab), np.int64)
    for caption in train_captions:
        np.add.at(counts, vocab.encode(caption), 1)
    manifest = {
        **fingerprint,
        "input_size": size,
        "preprocessing": spec.preprocessing,
        **({"preset": _preset_record(cache_dir, settings, model)} if spec.presets else {}),
        "feature_shape": feature_shape,
        "vocab_file": VOCAB,
        "vocab_size_actual": len(vocab),
        "max_caption_tokens": max(len(vocab.encode(c)) for r in records for c in r.captions),
        "train_token_counts": counts.tolist(),
        "splits": splits,
        "skipped": skipped_summary(skipped, skipped_sha256.hexdigest()),
        "load_report": report.counts() if report else None,
        "source": source or {},
    }
    skipped_path = os.path.join(cache_dir, SKIPPED)
    if (not finished or json.loads(json.dumps(manifest)) != existing
            or not files.exists(skipped_path)):
        write_lines_atomic(skipped_path, skipped_lines)  # before the manifest, which is last
        write_json_atomic(manifest_path, manifest)
    logging.info("cache %s: %s; %d images skipped (%s)", cache_dir,
                 ", ".join(f"{s} {v['images']} images / {v['captions']} captions"
                           for s, v in splits.items()), len(skipped), skipped_path)
    return manifest


def skipped_summary(skipped: Sequence[dict], sha256: str) -> dict:
    """What the manifest says of the images in `SKIPPED` (which lists them all, however many):
    their number, per reason and per split (of those whose split is known), and the first
    `SAMPLE_PER_REASON` of each reason, in the file's order."""
    by_reason, by_split, sample = {}, {}, []
    for entry in skipped:
        seen = by_reason.get(entry["reason"], 0)
        if seen < SAMPLE_PER_REASON and len(sample) < SAMPLE_SIZE:
            sample.append(entry)
        by_reason[entry["reason"]] = seen + 1
        if "split" in entry:
            by_split[entry["split"]] = by_split.get(entry["split"], 0) + 1
    return {"file": SKIPPED, "sha256": sha256, "images": len(skipped), "by_reason": by_reason,
            "by_split": {s: by_split[s] for s in SPLITS if s in by_split}, "sample": sample}


def skipped_count(manifest: dict) -> int:
    """How many images the cache of `manifest` skipped; a cache written before `SKIPPED`
    existed listed them in the manifest itself (`skipped_images`, decoding failures only)."""
    if "skipped" in manifest:
        return manifest["skipped"]["images"]
    return len(manifest.get("skipped_images", []))


def _settings_of(settings: ExtractionSettings) -> dict:
    """The settings a cache records: `class_token` only for a keras_hub backbone (for the others
    it is always drop), so caches made before it existed keep their fingerprint."""
    values = dataclasses.asdict(settings)
    if not backbones.get_spec(settings.backbone).presets:
        del values["class_token"]
    return values


def _preset_record(cache_dir: str, settings: ExtractionSettings, model) -> dict:
    """What the manifest says of a keras_hub backbone: the preset given, the encoder kept in
    the cache, its preprocessing and what became of its class token."""
    folder = os.path.join(cache_dir, BACKBONE_PRESET)
    encoder = read_json(os.path.join(folder, backbones.PRESET_CONFIG))
    converter = read_json(os.path.join(folder, backbones.PRESET_CONVERTER))["config"]
    given = settings.weights.rstrip("/")
    token = model.get_layer("tokens").class_token
    return {"path": files.absolute(given), "name": os.path.basename(given),
            "class": backbones.preset_class(given) if files.exists(given) else None,
            "encoder": encoder["class_name"], "folder": BACKBONE_PRESET,
            **{k: encoder["config"].get(k) for k in ("image_shape", "patch_size", "hidden_dim",
                                                     "num_layers")},
            "scale": converter.get("scale"), "offset": converter.get("offset"),
            "class_token": {"drop": "dropped", "keep": "kept as the first cell of one row",
                            "none": "none (the encoder has no class token)"}[token]}


def _same(found: dict, fingerprint: dict) -> bool:
    return all(found.get(k) == v for k, v in fingerprint.items())


def _prepared(cache_dir: str, fingerprint: dict) -> bool:
    """Whether task 0 has written this extraction's settings, vocabulary and backbone."""
    settings = os.path.join(cache_dir, SETTINGS)
    return (files.exists(settings) and _same(read_json(settings), fingerprint)
            and files.exists(os.path.join(cache_dir, VOCAB))
            and files.exists(_stored_backbone(cache_dir, read_json(settings)["backbone"])))


def _wait(ready: Callable[[], bool], timeout: float, problem: str | Callable[[], str]) -> None:
    """Polls `ready` until it is true; after `timeout` seconds a UserError saying `problem`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except tf.errors.NotFoundError:  # a file removed between two looks: not ready yet
            pass
        if time.monotonic() > deadline:
            problem = problem() if callable(problem) else problem
            raise UserError(f"{problem} after {timeout:.0f}s: start every task (--task_index "
                            "0..N-1 --num_tasks N) with the same flags, or raise "
                            "--extract_wait_timeout; finished shards are kept")
        time.sleep(POLL_SECONDS)


def _claim(cache_dir: str, fingerprint: dict, overwrite: bool, alone: bool = True) -> None:
    """Makes sure `cache_dir` is empty or was started with exactly these settings, and clears
    partial files (partial shards only when `alone`: no other task is writing one)."""
    path = os.path.join(cache_dir, SETTINGS)
    if files.exists(path):
        previous = read_json(path)
        if previous != fingerprint:
            if not overwrite:
                changed = "; ".join(f"{k} was {previous.get(k)}, now {v}"
                                    for k, v in fingerprint.items() if previous.get(k) != v)
                raise UserError(
                    f"cache {cache_dir} was built with other settings ({changed}): pass "
                    f"another --cache_dir, or --overwrite to rebuild it")
            _clear(cache_dir)
    elif any(not n.startswith(".") for n in files.listdir(cache_dir)):
        if not overwrite:
            raise UserError(f"--cache_dir {cache_dir} is not empty and is not a feature cache: "
                            f"pass an empty or new folder")
        _clear(cache_dir)
    # Partial files of an interrupted run are started afresh. With other tasks, a shard's own
    # are left to the task that writes it (`_write_shard`): it may already be at work.
    for name in files.listdir(cache_dir):
        if name.startswith(".") and ".tmp" in name and (alone or ".tfrecord" not in name):
            files.remove(os.path.join(cache_dir, name))
    write_json_atomic(path, fingerprint)


def _clear(cache_dir: str) -> None:
    for name in files.listdir(cache_dir):
        if name == BACKBONE_PRESET:
            tf.io.gfile.rmtree(os.path.join(cache_dir, name))
        elif name.endswith((".tfrecord", ".tfrecord.json", ".h5")) or name in (
                MANIFEST, SETTINGS, VOCAB, SKIPPED):
            files.remove(os.path.join(cache_dir, name))


def _stored_backbone(cache_dir: str, name: str) -> str:
    """The file whose presence means the cache holds its backbone: the weights file, or the
    preset folder's config.json (copied last)."""
    if backbones.get_spec(name).presets:
        return os.path.join(cache_dir, BACKBONE_PRESET, backbones.PRESET_CONFIG)
    return os.path.join(cache_dir, BACKBONE_WEIGHTS)


def load_backbone(cache_dir: str, name: str):
    """The exact backbone that extracted the cache: `name` with the cache's own weights (a
    keras_hub backbone: its own preset, and the class-token rule of its settings)."""
    path = _stored_backbone(cache_dir, name)
    if not files.exists(path):
        raise UserError(f"{path} is missing: the cache has no backbone weights to rebuild its "
                        "backbone from; re-extract it with python -m dist_caption.extract_features")
    if not backbones.get_spec(name).presets:
        model = backbones.build_backbone(name, "none")
        model.load_weights(path)
        return model
    class_token = read_json(os.path.join(cache_dir, SETTINGS)).get("class_token", "drop")
    folder = os.path.dirname(path)
    if not files.is_remote(folder):
        return backbones.build_backbone(name, folder, class_token)
    with tempfile.TemporaryDirectory() as local:  # keras_hub reads local folders only
        for file in files.listdir(folder):
            tf.io.gfile.copy(os.path.join(folder, file), os.path.join(local, file))
        return backbones.build_backbone(name, local, class_token)


def _backbone(cache_dir: str, settings: ExtractionSettings):
    """The backbone, with the cache's own weights once they exist (a resume must match)."""
    if files.exists(_stored_backbone(cache_dir, settings.backbone)):
        return load_backbone(cache_dir, settings.backbone)
    if backbones.get_spec(settings.backbone).presets:
        encoder, converter = backbones.load_preset(settings.backbone, settings.weights)
        backbones.assemble_preset(settings.backbone, encoder, converter, settings.class_token)
        folder = os.path.join(cache_dir, BACKBONE_PRESET)
        with tempfile.TemporaryDirectory() as local:
            backbones.save_preset(encoder, converter, local)
            names = sorted(os.listdir(local), key=lambda n: n == backbones.PRESET_CONFIG)
            files.makedirs(folder)
            for name in names:  # config.json last: its presence means the preset is whole
                files.copy(os.path.join(local, name), os.path.join(folder, name))
        return load_backbone(cache_dir, settings.backbone)  # extract with what export gets
    path = os.path.join(cache_dir, BACKBONE_WEIGHTS)
    model = backbones.build_backbone(settings.backbone, settings.weights)
    with atomic_path(path, keep_suffix=True) as tmp:
        model.save_weights(tmp)
    return model


def _finished_shard(path: str) -> dict | None:
    """The sidecar of a complete, intact shard; None when it must be (re)written."""
    if not (files.exists(path) and files.exists(f"{path}.json")):
        return None
    info = read_json(f"{path}.json")
    if sha256_file(path) != info["sha256"]:
        logging.warning("shard %s is corrupt (sha256 differs): rebuilding it", path)
        return None
    return info


def _write_shard(path: str, records: Sequence[CaptionRecord], run, size: int,
                 batch_size: int, dtype: str, vocab: text.Vocabulary,
                 progress: Progress) -> dict:
    """Writes the shard at `path` (under a temporary name, then renamed), then its sidecar:
    a sidecar is there only once its shard is complete, which is what task 0 waits for."""
    folder, name = os.path.split(path)
    for stale in files.listdir(folder):  # what a killed writer of this shard left
        if (stale.startswith(f".{name}") and ".tmp" in stale) or stale == f"{name}.json":
            files.remove(os.path.join(folder, stale))
    with atomic_path(path) as tmp:
        info = _write_shard_to(tmp, path, records, run, size, batch_size, dtype, vocab,
                               progress)
    write_json_atomic(f"{path}.json", info)
    return info


def _write_shard_to(tmp: str, path: str, records: Sequence[CaptionRecord], run, size: int,
                    batch_size: int, dtype: str, vocab: text.Vocabulary,
                    progress: Progress) -> dict:
    written, captions = set(), 0
    with tf.io.TFRecordWriter(tmp) as writer:
        for index, grid in _features(records, run, size, batch_size):
            writer.write(_example(records[index], grid.astype(dtype), vocab))
            written.add(index)
            captions += len(records[index].captions)
            progress.update(1)
    skipped = []
    for index, record in enumerate(records):
        if index not in written:
            reason = _failure_reason(record.image_path, size)
            logging.warning("image %s (%s) skipped: %s", record.image_id, record.image_path,
                            reason)
            skipped.append({"image_id": record.image_id, "path": record.image_path,
                            "reason": reason})
            progress.update(1)
    info = {"file": os.path.basename(path), "images": len(written), "captions": captions,
            "bytes": files.size(tmp), "sha256": sha256_file(tmp), "skipped": skipped}
    return info
