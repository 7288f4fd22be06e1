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

import json
import os
import time
from typing import Mapping

from absl import flags, logging

from dist_caption import cli
from dist_caption import flags as dc_flags
from dist_caption.data import cache, sources, synthetic
from dist_caption.errors import UserError
from dist_caption.files import writable_folder

FLAGS = flags.FLAGS


def task_of(env: Mapping[str, str], task_index: int | None = None,
            num_tasks: int | None = None) -> cache.Task:
    """This process's extraction task: from the flags if given, else TF_CONFIG, else
    JOB_COMPLETION_INDEX with DIST_CAPTION_WORKERS, else the only task."""
    if task_index is not None or num_tasks is not None:
        task = cache.Task(task_index or 0, num_tasks or 1)
        source = "--task_index/--num_tasks"
    elif env.get("TF_CONFIG"):
        config = json.loads(env["TF_CONFIG"])
        cluster, me = config.get("cluster", {}), config.get("task", {})
        order = [kind for kind in ("chief", "worker") if kind in cluster]
        if me.get("type") not in order:
            raise UserError(f"TF_CONFIG task type {me.get('type')!r} extracts nothing: run "
                            "extraction on the chief and workers only, or pass --task_index")
        offset = sum(len(cluster[k]) for k in order[:order.index(me["type"])])
        task = cache.Task(offset + int(me.get("index", 0)),
                          sum(len(cluster[k]) for k in order))
        source = "TF_CONFIG"
    elif env.get("JOB_COMPLETION_INDEX"):
        if not env.get("DIST_CAPTION_WORKERS", "").isdigit():
            raise UserError("JOB_COMPLETION_INDEX is set but DIST_CAPTION_WORKERS (the Job's "
                            "completions) is not: set it, or pass --num_tasks")
        task = cache.Task(int(env["JOB_COMPLETION_INDEX"]), int(env["DIST_CAPTION_WORKERS"]))
        source = "JOB_COMPLETION_INDEX/DIST_CAPTION_WORKERS"
    else:
        return cache.Task()
    if not 0 <= task.index < task.count:
        raise UserError(f"extraction task {task.index} of {task.count} (from {source}): the "
                        "index must be below the number of tasks; make them agree")
    return task


def _wait_for_synthetic(folder: str, timeout: float) -> None:
    """Tasks other than 0 wait for task 0 to generate the synthetic dataset (generating it in
    every task would only repeat the same work)."""
    deadline = time.monotonic() + timeout
    while not synthetic.is_complete(folder):
        if time.monotonic() > deadline:
            raise UserError(f"no complete synthetic dataset in {folder} after {timeout:g} s: "
                            "did extraction task 0 fail? see its log")
        time.sleep(0.5)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    task = task_of(os.environ, FLAGS.task_index, FLAGS.num_tasks)
    cache_dir = writable_folder(
        FLAGS.cache_dir or dc_flags.default_cache_dir(FLAGS.dataset, FLAGS.backbone), "cache_dir")
    if FLAGS.dataset == "synthetic" and task.index:
        _wait_for_synthetic(FLAGS.synthetic_dir, FLAGS.extract_wait_timeout)
    records, report = sources.load_records(FLAGS)
    settings = cache.ExtractionSettings(
        dataset=FLAGS.dataset, backbone=FLAGS.backbone,
        weights="none" if FLAGS.backbone == "patches" else FLAGS.weights,
        feature_dtype=FLAGS.feature_dtype, shard_size=FLAGS.shard_size,
        vocab_size=FLAGS.vocab_size, min_count=FLAGS.min_count)
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
