"""tf.data input pipelines over the feature cache, for training and evaluation.

`caption_dataset` yields one example per caption (the image's features repeated for each of its
captions), shuffled, padded to a fixed length and batched, for training; with
`captions_per_image=k` a batch holds B/k images, each with k of its captions, and an
`image_index` saying which image each caption belongs to (the model encodes each image once).
`image_dataset` yields
one example per image with all its reference captions, for evaluation; `reference_dataset` the
same with the references as token ids, for self-critical training. Both take a
`tf.distribute.InputContext`: each input pipeline reads a disjoint part of the split (whole
shard files when there are at least as many files as pipelines, otherwise every N-th image).
"""

from __future__ import annotations

import logging
import os

import tensorflow as tf

from dist_caption.data import cache
from dist_caption.errors import UserError
from dist_caption import files
from dist_caption.files import read_json

_EXTRACT_HINT = "run python -m dist_caption.extract_features --cache_dir {}"


def load_manifest(cache_dir: str) -> dict:
    """The cache's manifest; a clear error when the folder is not a finished cache."""
    path = os.path.join(cache_dir, cache.MANIFEST)
    if not files.exists(path):
        raise UserError(f"no finished feature cache in {cache_dir} ({cache.MANIFEST} missing): "
                        + _EXTRACT_HINT.format(cache_dir))
    manifest = read_json(path)
    if manifest.get("format") != cache.FORMAT_VERSION:
        raise UserError(f"cache {cache_dir} has format {manifest.get('format')}, this version "
                        f"reads {cache.FORMAT_VERSION}: rebuild it with --overwrite")
    return manifest


def check_compatible(manifest: dict, expected: dict, cache_dir: str) -> None:
    """Raises if the cache differs from what a model was built for.

    `expected` holds any of `feature_shape`, `feature_dtype`, `vocab_sha256`, `backbone`.
    """
    for key, want in expected.items():
        have = manifest.get(key)
        if key == "feature_shape":
            have, want = list(have), list(want)
        if have != want:
            raise UserError(f"cache {cache_dir} has {key}={have} but {want} is expected: use "
                            f"the cache the model was trained on, or retrain on this one")


def split_files(cache_dir: str, manifest: dict, split: str, verify: bool = False) -> list[str]:
    """Paths of the split's shards; with `verify`, each one's sha256 is checked first."""
    if split not in manifest["splits"]:
        raise UserError(f"cache {cache_dir} has no {split!r} split (it has "
                        f"{', '.join(manifest['splits'])})")
    paths = []
    for info in manifest["splits"][split]["shards"]:
        path = os.path.join(cache_dir, info["file"])
        if not files.exists(path):
            raise UserError(f"shard {path} is missing: " + _EXTRACT_HINT.format(cache_dir)
                            + " again to rebuild it")
        if verify and cache.sha256_file(path) != info["sha256"]:
            raise UserError(f"shard {path} is corrupt (sha256 differs from the manifest): run "
                            f"the same extract_features command again to rebuild that shard")
        paths.append(path)
    return paths


def _records(files: list[str], input_context: tf.distribute.InputContext | None,
             shuffle: bool, seed: int) -> tf.data.Dataset:
    """Serialized examples of this input pipeline's part of `files`."""
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    record_shard = None
    if input_context and input_context.num_input_pipelines > 1:
        n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(files) >= n:
            files_ds = files_ds.shard(n, i)
        else:
            logging.info("%d shard files for %d input pipelines: sharding by image", len(files), n)
            record_shard = (n, i)
    if shuffle:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    records = files_ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if record_shard:
        records = records.shard(*record_shard)
    return records


def _parser(manifest: dict):
    shape = manifest["feature_shape"]
    dtype = tf.dtypes.as_dtype(manifest["feature_dtype"])

    def parse(serialized):
        ex = tf.io.parse_single_example(serialized, cache.FEATURE_SPEC)
        features = tf.reshape(tf.io.decode_raw(ex["features"], dtype), shape)
        tokens = tf.RaggedTensor.from_row_lengths(
            tf.sparse.to_dense(ex["tokens"]), tf.sparse.to_dense(ex["caption_lengths"]))
        return {"image_id": ex["image_id"], "image_path": ex["image_path"],
                "features": features, "tokens": tf.cast(tokens, tf.int32),
                "captions": tf.sparse.to_dense(ex["captions"])}

    return parse


def caption_dataset(cache_dir: str, split: str, batch_size: int, max_len: int,
                    input_context: tf.distribute.InputContext | None = None,
                    shuffle: bool = True, repeat: bool = True, seed: int = 0,
                    shuffle_images: int = 1024, verify: bool = False,
                    manifest: dict | None = None,
                    captions_per_image: int = 0) -> tf.data.Dataset:
    """Batches {'features': [B, h, w, c], 'tokens': int32 [B, max_len]}, one row per caption.

    Captions longer than `max_len` tokens (with [START] and [END]) are dropped, as the
    tutorials do, rather than cut (a cut caption would teach the model never to end). With a
    fixed `seed` the order is the same on every run, so a resumed run can skip to its step.

    With `captions_per_image=k` (a divisor of `batch_size`), batches are instead
    {'features': [B/k, h, w, c], 'tokens': [B, max_len], 'image_index': int32 [B]}: B/k images,
    each with k of its captions drawn at random at every visit (some twice when it has fewer
    than k); images without a caption that fits are skipped.
    """
    manifest = manifest or load_manifest(cache_dir)
    files = split_files(cache_dir, manifest, split, verify=verify)
    ds = _records(files, input_context, shuffle, seed).map(
        _parser(manifest), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shuffle:
        ds = ds.shuffle(shuffle_images, seed=seed + 1, reshuffle_each_iteration=True)
    if captions_per_image:
        return _image_major_batches(ds, manifest, batch_size, max_len, captions_per_image,
                                    shuffle, repeat, seed)

    def per_caption(ex):
        return tf.data.Dataset.from_tensor_slices(ex["tokens"]).map(
            lambda tokens: {"features": ex["features"], "tokens": tokens})

    ds = ds.flat_map(per_caption).filter(lambda ex: tf.shape(ex["tokens"])[0] <= max_len)
    if shuffle:
        ds = ds.shuffle(8 * batch_size, seed=seed + 2, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.padded_batch(batch_size, padded_shapes={"features": manifest["feature_shape"],
                                                    "tokens": [max_len]},
                         drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _image_major_batches(ds: tf.data.Dataset, manifest: dict, batch_size: int, max_len: int,
                         k: int, shuffle: bool, repeat: bool, seed: int) -> tf.data.Dataset:
    """`caption_dataset` with `captions_per_image=k`, from its stream of parsed images."""
    if k < 1 or batch_size % k:
        raise UserError(f"a batch of {batch_size} captions does not split into images of "
                        f"{k} captions each: make the per-replica batch a multiple of "
                        f"--captions_per_image")

    def fits(ex):
        return tf.reduce_any(ex["tokens"].row_lengths() <= max_len)

    def pick(visit, ex):
        tokens = tf.gather(ex["tokens"], tf.where(ex["tokens"].row_lengths() <= max_len)[:, 0])
        order = tf.range(tokens.nrows(), dtype=tf.int32)
        if shuffle:  # stateless: the same draw for the same visit, so a resumed run agrees
            order = tf.random.experimental.stateless_shuffle(
                order, seed=tf.stack([tf.cast(seed, tf.int64), visit]))
        reps = (k + tf.size(order) - 1) // tf.size(order)
        chosen = tf.gather(tokens, tf.tile(order, [reps])[:k])
        return {"features": ex["features"], "tokens": chosen.to_tensor(shape=[k, max_len])}

    ds = ds.filter(fits)
    if repeat:
        ds = ds.repeat()
    ds = ds.enumerate().map(pick, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size // k, drop_remainder=True)

    def flatten(batch):
        images = batch_size // k
        return {"features": batch["features"],
                "tokens": tf.reshape(batch["tokens"], [batch_size, max_len]),
                "image_index": tf.repeat(tf.range(images, dtype=tf.int32), k)}

    return ds.map(flatten).prefetch(tf.data.AUTOTUNE)


def reference_dataset(cache_dir: str, split: str, batch_size: int,
                      input_context: tf.distribute.InputContext | None = None,
                      shuffle: bool = True, repeat: bool = True, seed: int = 0,
                      shuffle_images: int = 1024,
                      manifest: dict | None = None) -> tf.data.Dataset:
    """Batches of images with all their tokenised references, for self-critical training.

    {'image_id': string [B], 'features': [B, h, w, c],
     'references': int32 [B, R, T]}: every reference caption of each image as token ids
    ([START] and [END] included; none cut: T is the cache's longest caption), padded with 0 up
    to the batch's most captions R (without `repeat`, the last batch may be short). Same sharding, seeded order and resume as `caption_dataset`.
    """
    manifest = manifest or load_manifest(cache_dir)
    files = split_files(cache_dir, manifest, split)
    ds = _records(files, input_context, shuffle, seed).map(
        _parser(manifest), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shuffle:
        ds = ds.shuffle(shuffle_images, seed=seed + 1, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    length = manifest["max_caption_tokens"]
    ds = ds.map(lambda ex: {"image_id": ex["image_id"], "features": ex["features"],
                            "references": ex["tokens"].to_tensor(shape=[None, length])})
    return ds.padded_batch(batch_size, drop_remainder=repeat).prefetch(tf.data.AUTOTUNE)


def image_dataset(cache_dir: str, split: str, batch_size: int,
                  input_context: tf.distribute.InputContext | None = None,
                  limit: int | None = None, manifest: dict | None = None) -> tf.data.Dataset:
    """Batches of whole images in cache order, for evaluation.

    {'image_id': [B], 'image_path': [B], 'features': [B, h, w, c],
     'captions': string [B, n] (reference captions, padded with '')}.
    """
    manifest = manifest or load_manifest(cache_dir)
    files = split_files(cache_dir, manifest, split)
    ds = _records(files, input_context, shuffle=False, seed=0).map(
        _parser(manifest), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k != "tokens"})
    if limit is not None:
        ds = ds.take(limit)
    return ds.padded_batch(batch_size).prefetch(tf.data.AUTOTUNE)
