"""Training-step throughput: eager vs tf.function vs XLA, float32 vs bfloat16, 1 vs 2 replicas;
and one row per caption vs image-major batches (`--captions_per_image`).

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
             dropout=0.1, warmup_steps=10, stem="linear")
GRID, VOCAB = (8, 8, 432), 1000
CONFIGS = [(mode, precision, replicas)
           for replicas in (1, 2) for precision in ("float32", "mixed_bfloat16")
           for mode in ("eager", "function", "xla")]


def setup(strategy, precision: str, xla: bool, **overrides):
    """(config, the trainer's Stepper, an iterator repeating one fixed global batch);
    `overrides` change MODEL's training settings (e.g. dropout)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from dist_caption import train

    keras.mixed_precision.set_global_policy(precision)
    cfg = train.TrainConfig(cache_dir="-", model_dir="-", **{**MODEL, **overrides})
    manifest = {"vocab_size_actual": VOCAB, "feature_shape": list(GRID),
                "train_token_counts": np.ones(VOCAB).tolist()}
    model, optimizer = train.build_model_and_optimizer(strategy, cfg, manifest, 10_000)
    stepper = train.Stepper(strategy, model, optimizer, cfg, precision, xla=xla)
    rng = np.random.default_rng(0)
    per_replica = cfg.global_batch_size // strategy.num_replicas_in_sync
    k = cfg.captions_per_image or 1
    batch = {"features": rng.uniform(size=(per_replica // k, *GRID)).astype(np.float16),
             "tokens": rng.integers(4, VOCAB, (per_replica, cfg.max_len)).astype(np.int32)}
    if cfg.captions_per_image:
        batch["image_index"] = np.repeat(np.arange(per_replica // k, dtype=np.int32), k)
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


def xla_probe(seconds: float) -> dict:
    """Why XLA's step is slower on this CPU: the step's largest matmul (the feed-forward's
    [64*23, 256] x [256, 1024]) as a plain `tf.function` and under XLA, and one replica's
    compiled forward + backward pass with and without dropout."""
    import time

    import tensorflow as tf

    from dist_caption import train

    def fetch(out) -> None:
        tf.nest.map_structure(lambda t: tf.convert_to_tensor(t).numpy(), out)

    def per_call_s(fn, warmup: int = 2) -> float:
        for _ in range(warmup):
            fetch(fn())
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 6 or calls < 5:
            fetch(fn())
            calls += 1
        return (time.perf_counter() - start) / calls

    a = tf.random.normal([MODEL["global_batch_size"] * (MODEL["max_len"] - 1), MODEL["units"]])
    b = tf.random.normal([MODEL["units"], 4 * MODEL["units"]])
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    result = {"matmul_shape": [list(a.shape), list(b.shape)], "matmul_gflops": {},
              "forward_backward_ms": {}}
    for name, jit in (("function", False), ("xla", True)):
        matmul = tf.function(lambda: tf.linalg.matmul(a, b), jit_compile=jit)
        result["matmul_gflops"][name] = round(flops / per_call_s(matmul) / 1e9, 1)
    strategy = train.make_strategy("default")
    for dropout in (MODEL["dropout"], 0.0):
        for name, xla in (("function", False), ("xla", True)):
            _, stepper, batches = setup(strategy, "float32", xla, dropout=dropout)
            batch, scale = next(batches), tf.constant(1.0)
            forward_backward = stepper.forward_backward if xla else \
                tf.function(stepper.forward_backward)
            result["forward_backward_ms"][f"{name}, dropout {dropout}"] = round(
                1e3 * per_call_s(lambda: forward_backward(batch, scale)), 1)
    return result


def image_major(seconds: float) -> list[dict]:
    """Examples/s of the quickstart's model (conv stem) at widths 256 and 128, with one row
    per caption (each image encoded once per caption) and with --captions_per_image 4 (once
    per image), alternated in one process so the ratios share the machine's state."""
    import time

    import tensorflow as tf

    from dist_caption import train

    strategy = train.make_strategy("default")
    stop = tf.constant(0.0)
    runs = []
    for units in (256, 128):
        steps = {}
        for k in (0, 4):
            cfg, stepper, batches = setup(strategy, "float32", False, stem="conv", units=units,
                                          dropout=0.0, captions_per_image=k)
            for _ in range(3):
                stepper.train_step(batches, stop)
            steps[k] = (stepper, batches)
        rate = {0: [0, 0.0], 4: [0, 0.0]}
        for _ in range(4):  # alternate, a quarter of the time each
            for k, (stepper, batches) in steps.items():
                start = time.perf_counter()
                while time.perf_counter() - start < seconds / 4:
                    float(stepper.train_step(batches, stop)["loss"])
                    rate[k][0] += 1
                rate[k][1] += time.perf_counter() - start
        for k, (n, elapsed) in rate.items():
            runs.append({"units": units, "stem": "conv", "captions_per_image": k,
                         "examples_per_s": n * cfg.global_batch_size / elapsed})
        runs[-1]["speedup"] = runs[-1]["examples_per_s"] / runs[-2]["examples_per_s"]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image_major", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(xla_probe(args.seconds)))
        return
    if args.image_major:
        print(json.dumps(image_major(args.seconds)))
        return
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
    extra = {}
    for name in ("probe", "image_major"):
        out = subprocess.run([sys.executable, __file__, "--seconds", str(args.seconds),
                              f"--{name}"], capture_output=True, text=True, check=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        extra[name] = json.loads(out.stdout.strip().splitlines()[-1])
    result = {"model": {**MODEL, "feature_grid": GRID, "vocab": VOCAB}, "cpus": os.cpu_count(),
              "runs": rows, "xla_probe": extra["probe"], "image_major": extra["image_major"]}
    publish("train_step", result)


if __name__ == "__main__":
    main()
