"""Runs a frozen backbone over every image once and writes the sharded feature cache.

    python -m dist_caption.extract_features                      # synthetic, patches
    python -m dist_caption.extract_features --dataset karpathy \\
        --karpathy_json dataset_coco.json --image_dir coco/ --backbone mobilenet_v3_small
    python -m dist_caption.extract_features --task_index 1 --num_tasks 4 ...   # 1 of 4 processes

Re-running the same command finishes an interrupted extraction (finished shards are kept,
corrupt ones rebuilt) and is otherwise a no-op check. `--cache_dir` may be a gs:// (any
tf.io.gfile) URL.

N processes (on one host or many, sharing the cache folder) split the work: each takes every
N-th shard. Its index comes from `--task_index/--num_tasks`, else TF_CONFIG (chief first, then
the workers), else JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) with DIST_CAPTION_WORKERS.
Task 0 writes the vocabulary and the backbone weights before the others start on shards, and
the manifest once all have finished; every task exits once the manifest is written.
"""

from __future__ import annotations

import os

from absl import flags, logging

from dist_caption import cli, cluster, config
from dist_caption import flags as dc_flags

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from dist_caption.data import cache, sources, synthetic
    from dist_caption.files import writable_folder

    logging.set_verbosity(logging.INFO)
    task = cluster.task_of(os.environ, FLAGS.task_index, FLAGS.num_tasks)
    cache_dir = writable_folder(
        FLAGS.cache_dir or config.default_cache_dir(FLAGS.dataset, FLAGS.backbone), "cache_dir")
    if FLAGS.dataset == "synthetic" and task.index:
        synthetic.wait_for_complete(FLAGS.synthetic_dir, FLAGS.extract_wait_timeout)
    records, report = sources.load_records(FLAGS)
    settings = config.ExtractionSettings(
        dataset=FLAGS.dataset, backbone=FLAGS.backbone,
        weights="none" if FLAGS.backbone == "patches" else FLAGS.weights,
        feature_dtype=FLAGS.feature_dtype, shard_size=FLAGS.shard_size,
        vocab_size=FLAGS.vocab_size, min_count=FLAGS.min_count, class_token=FLAGS.class_token)
    manifest = cache.extract(records, cache_dir, settings, report,
                             batch_size=FLAGS.extract_batch_size, overwrite=FLAGS.overwrite,
                             source=sources.source_settings(FLAGS), task=task,
                             wait_timeout=FLAGS.extract_wait_timeout)
    splits = ", ".join(f"{s}: {v['images']} images, {v['captions']} captions, "
                       f"{len(v['shards'])} shards" for s, v in manifest["splits"].items())
    print(f"feature cache {cache_dir}: grid {manifest['feature_shape']} "
          f"{manifest['feature_dtype']}, vocabulary {manifest['vocab_size_actual']}; {splits}; "
          f"{cache.skipped_count(manifest)} images skipped (listed in "
          f"{os.path.join(cache_dir, cache.SKIPPED)})"
          + (f" (task {task.index} of {task.count})" if task.count > 1 else ""))


if __name__ == "__main__":
    dc_flags.define_extract_flags()
    cli.run(main)
