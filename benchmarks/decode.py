"""Caption decoding speed: the exported KV-cached `serving_default` (with and without XLA)
against a same-size decoder that recomputes the whole prefix at every step (the tutorials' way).

    .venv/bin/python benchmarks/decode.py [--seconds 3] [--out PATH]

Model: `bench_model.py` (the quickstart's decoder size, every caption exactly 20 tokens). All
three paths take the same JPEG bytes and run the same image decoding and backbone in the
graph; only decoding differs:

- `cached`: the exported SavedModel's `serving_default`, reloaded with `tf.saved_model.load`;
- `cached_xla`: the same, exported with `--export_xla`;
- `recompute`: a `tf.function` running the full model on [START] + the prefix at every step.

Each is timed call by call for `--seconds` per batch size, in one process, the three paths
taking 5 turns each in alternation (the machine is shared: its load changes under a run).
The decoder's arithmetic rate (GFLOP/s from `bench_model.flops_per_caption`, image decoding
not counted) is set against this machine's float32 matmul rate measured in the same run.
Runs on the first GPU TensorFlow sees, if any (`launch/gpu_check.sh` runs it there with
`--out`). Writes benchmarks/results/decode.json (or PATH):
{"batch": {"1": {"cached": {"captions_per_s",
"p50_ms", "p99_ms"}, ...}}, "speedup", "decoder_gflops", "share_of_matmul_rate", ...}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench_model import (CAPTION_TOKENS, CONFIG, DESCRIPTION, endless_model,  # noqa: E402
                         flops_per_caption, module)
from results_file import publish  # noqa: E402

from dist_caption import exporting  # noqa: E402
from dist_caption.model import recompute_greedy_decode  # noqa: E402

BATCHES = (1, 8, 64)


def matmul_gflops(seconds: float, n: int = 2048) -> float:
    """This machine's float32 matrix-multiply rate with TensorFlow (n x n by n x n)."""
    a, b = tf.random.normal([n, n]), tf.random.normal([n, n])
    matmul = tf.function(lambda: tf.linalg.matmul(a, b))
    matmul().numpy()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        matmul().numpy()
        calls += 1
    return 2 * n ** 3 * calls / (time.perf_counter() - start) / 1e9


def timings(fns: dict, images: tf.Tensor, seconds: float, turns: int = 5) -> dict:
    """{name: latency figures} of every path in `fns`, each timed call by call for `seconds` in
    all, in `turns` alternating turns (at least one call each): a change in the machine's load
    (it is shared) falls on every path alike, so their ratios hold."""
    for fn in fns.values():
        fn(images)  # trace / compile
        fn(images)
    latencies = {name: [] for name in fns}
    for _ in range(turns):
        for name, fn in fns.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / turns or not latencies[name]:
                t = time.perf_counter()
                np.asarray(fn(images))
                latencies[name].append(time.perf_counter() - t)
    batch = int(images.shape[0])
    result = {}
    for name, values in latencies.items():
        values = np.array(values)
        result[name] = {"captions_per_s": round(batch / values.mean(), 2),
                        "p50_ms": round(1e3 * float(np.percentile(values, 50)), 2),
                        "p99_ms": round(1e3 * float(np.percentile(values, 99)), 2),
                        "calls": len(values)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", help="Write the JSON here instead of "
                        "benchmarks/results/decode.json (the CPU figures the README shows).")
    args = parser.parse_args()

    model = endless_model()
    paths = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, xla in (("cached", False), ("cached_xla", True)):
            paths[name] = os.path.join(tmp, name)
            exporting.save(module(model, xla), paths[name])
        # The loaded objects (kept: their functions read their variables); their methods take
        # the signatures' defaults for the decoding controls.
        loaded = {name: tf.saved_model.load(path) for name, path in paths.items()}
        served = {name: module.serving_default for name, module in loaded.items()}
        recompute_module = module(model, xla=False)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def recompute(image_bytes):
            features = recompute_module.features(image_bytes)
            return recompute_greedy_decode(model, features, CONFIG.max_len)["tokens"]

        paths_fn = {"cached": lambda b: served["cached"](image_bytes=b)["tokens"],
                    "cached_xla": lambda b: served["cached_xla"](image_bytes=b)["tokens"],
                    "recompute": recompute}
        image = exporting.warmup_image()
        flops = flops_per_caption()
        result = {"model": DESCRIPTION, "flops_per_caption": flops,
                  "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__,
                              "matmul_gflops": round(matmul_gflops(args.seconds), 1)},
                  "batch": {}, "speedup": {}, "decoder_gflops": {}, "share_of_matmul_rate": {}}
        for batch in BATCHES:
            images = tf.constant([image] * batch)
            row = timings(paths_fn, images, args.seconds)
            lengths = {name: int(tf.reduce_sum(tf.cast(fn(images)[0] > 0, tf.int32)))
                       for name, fn in paths_fn.items()}
            assert set(lengths.values()) == {CAPTION_TOKENS}, lengths
            result["batch"][str(batch)] = row
            result["speedup"][str(batch)] = {
                name: round(row[name]["captions_per_s"] / row["recompute"]["captions_per_s"], 2)
                for name in ("cached", "cached_xla")}
            # Image decoding is left out of the FLOP count, so this understates the rate.
            result["decoder_gflops"][str(batch)] = {
                name: round(row[name]["captions_per_s"] * flops["caption"] / 1e9, 1)
                for name in ("cached", "cached_xla")}
            result["share_of_matmul_rate"][str(batch)] = {
                name: round(value / result["machine"]["matmul_gflops"], 3)
                for name, value in result["decoder_gflops"][str(batch)].items()}
            print(f"batch {batch}: " + ", ".join(
                f"{k} {v['captions_per_s']} captions/s" for k, v in row.items()), flush=True)
    result["machine"]["device"] = (tf.config.list_logical_devices("GPU")
                                   or tf.config.list_logical_devices("CPU"))[0].name
    publish("decode", result, args.out)


if __name__ == "__main__":
    main()
