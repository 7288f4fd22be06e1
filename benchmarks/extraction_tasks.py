"""Feature extraction with 1 and with 2 cooperating local processes; prints JSON.

    .venv/bin/python benchmarks/extraction_tasks.py [--images 1200] [--repeats 3]

Builds a synthetic dataset in a temporary folder, then runs `python -m
dist_caption.extract_features` over it into a fresh cache twice: once as one process (with
every core), once as two (`--task_index 0/1 --num_tasks 2`, each with half the cores, as
`launch/train.sh --workers 2` runs them). The rate is images / wall-clock seconds from starting
the processes to the last one exiting (TensorFlow start-up, the vocabulary, the waits and the
manifest included), the median of `--repeats` runs of each, alternated, every run into a fresh
cache. Writes benchmarks/results/extraction_tasks.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dist_caption.data import sources  # noqa: E402
from dist_caption.data.records import LoadReport  # noqa: E402
from dist_caption.launching import share_cores  # noqa: E402
from results_file import publish  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tasks(n: int, synthetic_dir: str, cache_dir: str, args: argparse.Namespace) -> float:
    """Seconds for `n` extraction processes to build `cache_dir` together."""
    command = [sys.executable, "-m", "dist_caption.extract_features",
               f"--synthetic_dir={synthetic_dir}", f"--num_images={args.images}",
               f"--image_size={args.image_size}", f"--cache_dir={cache_dir}",
               f"--backbone={args.backbone}", "--weights=none", f"--shard_size={args.shard_size}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "PYTHONPATH": ROOT}
    start = time.perf_counter()
    procs = [subprocess.Popen([*command, f"--task_index={i}", f"--num_tasks={n}"], cwd=ROOT,
                              env=share_cores(dict(env), n), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            sys.exit(f"extraction failed: {err.strip().splitlines()[-1]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--backbone", default="mobilenet_v3_small")
    parser.add_argument("--shard_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        synthetic_dir = os.path.join(folder, "synthetic")
        sources.synthetic_records(synthetic_dir, args.images, 0, args.image_size, LoadReport())
        result = {"images": args.images, "image_size": args.image_size,
                  "backbone": args.backbone, "shard_size": args.shard_size,
                  "cpus": os.cpu_count()}
        runs = {1: [], 2: []}
        for repeat in range(args.repeats):
            for n in runs:
                runs[n].append(run_tasks(n, synthetic_dir,
                                         os.path.join(folder, f"cache-{n}-{repeat}"), args))
        for n, seconds in runs.items():
            median = statistics.median(seconds)
            result[f"processes_{n}"] = {"seconds": seconds, "median_seconds": median,
                                        "images_per_s": args.images / median}
        result["speedup_2_over_1"] = (result["processes_2"]["images_per_s"]
                                      / result["processes_1"]["images_per_s"])
    publish("extraction_tasks", result)


if __name__ == "__main__":
    main()
