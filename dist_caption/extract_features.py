"""Runs a frozen backbone over every image once and writes the sharded feature cache.

    python -m dist_caption.extract_features                      # synthetic, patches
    python -m dist_caption.extract_features --dataset karpathy \\
        --karpathy_json dataset_coco.json --image_dir coco/ --backbone mobilenet_v3_small

Re-running the same command finishes an interrupted extraction (finished shards are kept,
corrupt ones rebuilt) and is otherwise a no-op check.
"""

from __future__ import annotations

from absl import flags, logging

from dist_caption import cli
from dist_caption import flags as dc_flags
from dist_caption.data import cache, sources
from dist_caption.files import writable_folder

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    cache_dir = writable_folder(
        FLAGS.cache_dir or dc_flags.default_cache_dir(FLAGS.dataset, FLAGS.backbone), "cache_dir")
    records, report = sources.load_records(FLAGS)
    settings = cache.ExtractionSettings(
        dataset=FLAGS.dataset, backbone=FLAGS.backbone,
        weights="none" if FLAGS.backbone == "patches" else FLAGS.weights,
        feature_dtype=FLAGS.feature_dtype, shard_size=FLAGS.shard_size,
        vocab_size=FLAGS.vocab_size, min_count=FLAGS.min_count)
    manifest = cache.extract(records, cache_dir, settings, report,
                             batch_size=FLAGS.extract_batch_size, overwrite=FLAGS.overwrite,
                             source=sources.source_settings(FLAGS))
    splits = ", ".join(f"{s}: {v['images']} images, {v['captions']} captions, "
                       f"{len(v['shards'])} shards" for s, v in manifest["splits"].items())
    print(f"feature cache {cache_dir}: grid {manifest['feature_shape']} "
          f"{manifest['feature_dtype']}, vocabulary {manifest['vocab_size_actual']}; {splits}; "
          f"{len(manifest['skipped_images'])} images skipped")


if __name__ == "__main__":
    dc_flags.define_extract_flags()
    cli.run(main)
