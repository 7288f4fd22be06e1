"""Training-step throughput: eager vs tf.function vs XLA, float32 vs bfloat16, 1 vs 2 replicas.

    .venv/bin/python benchmarks/train_step.py [--seconds 8]

Model: Transformer decoder, 2 layers, width 256, 2 heads, feed-forward 1024, vocabulary 1000,
captions of 24 tokens, an 8x8x432 feature grid (the `patches` backbone); global batch 64.
The step is the trainer's own (`train.Stepper`) fed one fixed batch, so input costs nothing.
Each configuration runs in its own process (the replica count and the precision policy are
process-wide). Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from results_file import publish

MODEL = dict(units=256, num_layers=2, num_heads=2, max_len=24, global_batch_size=64,
             dropout=0.1, warmup_steps=10)
GRID, VOCAB = (8, 8, 432), 1000
CONFIGS = [(mode, precision, replicas)
           for replicas in (1, 2) for precision in ("float32", "mixed_bfloat16")
           for mode in ("eager", "function", "xla")]


def setup(strategy, precision: str, xla: bool):
    """(config, the trainer's Stepper, an iterator repeating one fixed global batch)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from dist_caption import train

    keras.mixed_precision.set_global_policy(precision)
    cfg = train.TrainConfig(cache_dir="-", model_dir="-", **MODEL)
    manifest = {"vocab_size_actual": VOCAB, "feature_shape": list(GRID),
                "train_token_counts": np.ones(VOCAB).tolist()}
    model, optimizer = train.build_model_and_optimizer(strategy, cfg, manifest, 10_000)
    stepper = train.Stepper(strategy, model, optimizer, cfg, precision, xla=xla)
    rng = np.random.default_rng(0)
    per_replica = cfg.global_batch_size // strategy.num_replicas_in_sync
    batch = {"features": rng.normal(size=(per_replica, *GRID)).astype(np.float16),
             "tokens": rng.integers(4, VOCAB, (per_replica, cfg.max_len)).astype(np.int32)}
    batches = iter(strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensors(batch).repeat()))
    return cfg, stepper, batches


def measure(mode: str, precision: str, replicas: int, seconds: float) -> dict:
    """Runs in a child process: steps/s of one configuration."""
    import time

    import tensorflow as tf

    from dist_caption import train

    strategy = train.make_strategy("mirrored" if replicas > 1 else "default",
                                   cpu_devices=replicas if replicas > 1 else 0)
    cfg, stepper, batches = setup(strategy, precision, xla=mode == "xla")
    step = stepper._train_step if mode == "eager" else stepper.train_step
    stop = tf.constant(0.0)
    for _ in range(3):
        step(batches, stop)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        float(step(batches, stop)["loss"])
        steps += 1
    rate = steps / (time.perf_counter() - start)
    return {"mode": mode, "precision": precision, "replicas": replicas, "steps_per_s": rate,
            "examples_per_s": rate * cfg.global_batch_size,
            "tokens_per_s": rate * cfg.global_batch_size * (cfg.max_len - 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, precision, replicas = args.child
        print(json.dumps(measure(mode, precision, int(replicas), args.seconds)))
        return
    rows = []
    for mode, precision, replicas in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--seconds", str(args.seconds),
                              "--child", mode, precision, str(replicas)],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"model": {**MODEL, "feature_grid": GRID, "vocab": VOCAB}, "cpus": os.cpu_count(),
              "runs": rows}
    publish("train_step", result)


if __name__ == "__main__":
    main()
