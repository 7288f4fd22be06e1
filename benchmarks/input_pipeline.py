"""Input pipeline and extraction rates on this machine; prints JSON.

    .venv/bin/python benchmarks/input_pipeline.py [--images 600] [--batch 64]

Builds a synthetic dataset in a temporary folder, extracts it with `patches` and with
`mobilenet_v3_small` (random weights: the speed is the same as with ImageNet's), then reads the
patches cache with the training pipeline. Writes benchmarks/results/input_pipeline.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dist_caption.data import cache, pipeline, sources  # noqa: E402
from dist_caption.data.records import LoadReport  # noqa: E402
from results_file import publish  # noqa: E402



def extraction_rate(records, backbone: str, folder: str) -> tuple[float, str]:
    out = os.path.join(folder, backbone)
    start = time.perf_counter()
    cache.extract(records, out, cache.ExtractionSettings("synthetic", backbone, "none"),
                  batch_size=32)
    return len(records) / (time.perf_counter() - start), out


def read_rate(cache_dir: str, batch: int, max_len: int, seconds: float = 10.0) -> dict:
    """Examples/s the training pipeline delivers (shuffled, padded, batched), after warm-up."""
    ds = pipeline.caption_dataset(cache_dir, "train", batch, max_len, seed=0)
    it = iter(ds)
    for _ in range(5):
        next(it)
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        batches += 1
    elapsed = time.perf_counter() - start
    return {"examples_per_s": batches * batch / elapsed, "batches_per_s": batches / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        records = sources.synthetic_records(os.path.join(folder, "synthetic"), args.images, 0,
                                            128, LoadReport())
        result = {"images": len(records), "batch": args.batch, "cpus": os.cpu_count()}
        for backbone in ("patches", "mobilenet_v3_small"):
            rate, out = extraction_rate(records, backbone, folder)
            result[f"extract_{backbone}_images_per_s"] = rate
            if backbone == "patches":
                result["read_patches_cache"] = read_rate(out, args.batch, 24)
    publish("input_pipeline", result)


if __name__ == "__main__":
    main()
