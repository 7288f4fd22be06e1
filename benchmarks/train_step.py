"""Training-step throughput: eager vs tf.function vs XLA, float32 vs bfloat16, 1 vs 2 replicas;
the quickstart's model; and one row per caption vs image-major batches.

    .venv/bin/python benchmarks/train_step.py [--seconds 8]

`runs`: Transformer decoder, 2 layers, width 256, 2 heads, feed-forward 1024, vocabulary 1000,
captions of 24 tokens, an 8x8x432 feature grid (the `patches` backbone, linear stem); global
batch 64. `quickstart`: the model `launch/quickstart.sh` trains (its cross-entropy flags, read
from the script by `quickstart_recipe.py`; conv stem of 64 channels, vocabulary 41) in one
process, tf.function against XLA with dropout 0 and 0.1, alternated in one process per
precision so each ratio shares the machine's state. `xla_probe`: the pieces that decide XLA's
speed on this CPU.
The step is the trainer's own (`training.Stepper`) fed one fixed batch, so input costs nothing.
Each precision and replica count runs in its own process (both are process-wide), its eager,
tf.function and XLA steps alternated there. Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from quickstart_recipe import cross_entropy_settings
from results_file import publish

MODEL = dict(units=256, num_layers=2, num_heads=2, max_len=24, global_batch_size=64,
             dropout=0.1, warmup_steps=10, stem="linear")
GRID, VOCAB = (8, 8, 432), 1000
# launch/quickstart.sh's cross-entropy settings (read from the script), over the defaults it
# leaves and the conv stem that `auto` picks on the `patches` cache.
QUICKSTART = {**dict(num_layers=2, num_heads=2, max_len=24, stem="conv", stem_channels=64,
                     warmup_steps=10), **cross_entropy_settings()}
QUICKSTART_VOCAB = 41
CONFIGS = [(precision, replicas)
           for replicas in (1, 2) for precision in ("float32", "mixed_bfloat16")]


def setup(strategy, precision: str, xla: bool, model: dict = MODEL, vocab: int = VOCAB,
          **overrides):
    """(config, the trainer's Stepper, an iterator repeating one fixed global batch);
    `overrides` change `model`'s training settings (e.g. dropout)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from dist_caption import training

    keras.mixed_precision.set_global_policy(precision)
    cfg = training.TrainConfig(cache_dir="-", model_dir="-", **{**model, **overrides})
    manifest = {"vocab_size_actual": vocab, "feature_shape": list(GRID),
                "train_token_counts": np.ones(vocab).tolist()}
    model, optimizer = training.build_model_and_optimizer(strategy, cfg, manifest, 10_000)
    stepper = training.Stepper(strategy, model, optimizer, cfg, precision, xla=xla)
    rng = np.random.default_rng(0)
    per_replica = cfg.global_batch_size // strategy.num_replicas_in_sync
    k = cfg.captions_per_image or 1
    batch = {"features": rng.uniform(size=(per_replica // k, *GRID)).astype(np.float16),
             "tokens": rng.integers(4, vocab, (per_replica, cfg.max_len)).astype(np.int32)}
    if cfg.captions_per_image:
        batch["image_index"] = np.repeat(np.arange(per_replica // k, dtype=np.int32), k)
    batches = iter(strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensors(batch).repeat()))
    return cfg, stepper, batches


def alternate(steps: dict, seconds: float) -> dict:
    """Examples/s of each (step function, batches, global batch), timed in turns, a quarter of
    `seconds` each per round, so that the ratios share the machine's state."""
    import time

    import tensorflow as tf

    stop = tf.constant(0.0)
    for step, batches, _ in steps.values():
        for _ in range(3):
            step(batches, stop)
    done = {name: [0, 0.0] for name in steps}
    for _ in range(4):
        for name, (step, batches, _) in steps.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / 4:
                float(step(batches, stop)["loss"])
                done[name][0] += 1
            done[name][1] += time.perf_counter() - start
    return {name: n * steps[name][2] / elapsed for name, (n, elapsed) in done.items()}


def measure(precision: str, replicas: int, seconds: float) -> list[dict]:
    """Runs in a child process: eager, tf.function and XLA steps of one precision and replica
    count, alternated."""
    from dist_caption import training

    strategy = training.make_strategy("mirrored" if replicas > 1 else "default",
                                   cpu_devices=replicas if replicas > 1 else 0)
    steps = {}
    for mode in ("eager", "function", "xla"):
        cfg, stepper, batches = setup(strategy, precision, xla=mode == "xla")
        step = stepper._train_step if mode == "eager" else stepper.train_step
        steps[mode] = (step, batches, cfg.global_batch_size)
    rates = alternate(steps, 3 * seconds)
    return [{"mode": mode, "precision": precision, "replicas": replicas,
             "steps_per_s": rate / cfg.global_batch_size, "examples_per_s": rate,
             "tokens_per_s": rate * (cfg.max_len - 1)} for mode, rate in rates.items()]


def quickstart(precision: str, seconds: float) -> list[dict]:
    """The quickstart's model, tf.function against XLA, dropout 0 and 0.1 (one process)."""
    from dist_caption import training

    strategy = training.make_strategy("default")
    steppers = {}
    for dropout in (0.0, 0.1):
        for mode in ("function", "xla"):
            cfg, stepper, batches = setup(strategy, precision, mode == "xla", QUICKSTART,
                                          QUICKSTART_VOCAB, dropout=dropout)
            steppers[(dropout, mode)] = (stepper.train_step, batches, cfg.global_batch_size)
    rates = alternate(steppers, 2 * seconds)
    return [{"precision": precision, "dropout": dropout,
             "function_examples_per_s": rates[(dropout, "function")],
             "xla_examples_per_s": rates[(dropout, "xla")],
             "xla_over_function": rates[(dropout, "xla")] / rates[(dropout, "function")]}
            for dropout in (0.0, 0.1)]


def xla_probe(seconds: float) -> dict:
    """What decides XLA's speed on this CPU, each piece plain (`tf.function`) and compiled:
    the quickstart step's largest matmul (feed-forward, [captions*23, 128] x [128, 512]) in
    float32 and bfloat16; the conv stem's forward + backward pass over the step's images; a
    dropout mask over [captions, 23, 128] from TensorFlow's stateless random numbers and from
    `HashDropout`."""
    import time

    import keras
    import tensorflow as tf

    from dist_caption.model.layers import DropoutSeeds, HashDropout, PixelStem, dropout_seed

    def per_call_ms(fn) -> float:
        for _ in range(2):
            tf.nest.map_structure(lambda t: t.numpy(), fn())
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 8 or calls < 5:
            tf.nest.map_structure(lambda t: t.numpy(), fn())
            calls += 1
        return 1e3 * (time.perf_counter() - start) / calls

    def both(fn, *args) -> dict:
        """`fn(*args)` in ms: arguments, not constants, so that nothing is constant-folded."""
        return {name: round(per_call_ms(lambda f=tf.function(fn, jit_compile=jit): f(*args)), 2)
                for name, jit in (("function", False), ("xla", True))}

    rows = QUICKSTART["global_batch_size"] * (QUICKSTART["max_len"] - 1)
    units = QUICKSTART["units"]
    result = {"matmul_shape": [[rows, units], [units, 4 * units]], "matmul_gflops": {}}
    for dtype in ("float32", "bfloat16"):
        a = tf.cast(tf.random.normal([rows, units]), dtype)
        b = tf.cast(tf.random.normal([units, 4 * units]), dtype)
        ms = both(tf.linalg.matmul, a, b)
        result["matmul_gflops"][dtype] = {k: round(2 * rows * units * 4 * units / v / 1e6, 1)
                                          for k, v in ms.items()}
    images = QUICKSTART["global_batch_size"] // QUICKSTART["captions_per_image"]
    stem = PixelStem(12, QUICKSTART["stem_channels"])
    pixels = tf.random.uniform([images, *GRID])
    stem(pixels)

    def stem_forward_backward(pixels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(stem(pixels) ** 2)
        return tape.gradient(loss, stem.trainable_variables)

    result["stem_forward_backward_ms"] = both(stem_forward_backward, pixels)
    x = tf.random.normal([QUICKSTART["global_batch_size"], QUICKSTART["max_len"] - 1, units])
    seed = dropout_seed(1)
    result["dropout_mask_ms"] = {
        "tensorflow_stateless": both(lambda x, seed: tf.nn.experimental.stateless_dropout(
            x, 0.1, seed=tf.stack([tf.cast(seed, tf.int64), 0])), x, seed),
        "hash": both(lambda x, seed: HashDropout(0.1)(x, seeds=DropoutSeeds(seed),
                                                      training=True), x, seed)}
    keras.mixed_precision.set_global_policy("float32")
    return result


def image_major(seconds: float) -> list[dict]:
    """Examples/s of the quickstart's model (conv stem) at widths 256 and 128, with one row
    per caption (each image encoded once per caption) and with --captions_per_image 4 (once
    per image), alternated in one process so the ratios share the machine's state."""
    from dist_caption import training

    strategy = training.make_strategy("default")
    runs = []
    for units in (256, 128):
        steppers = {}
        for k in (0, 4):
            cfg, stepper, batches = setup(strategy, "float32", False, stem="conv", units=units,
                                          dropout=0.0, captions_per_image=k)
            steppers[k] = (stepper.train_step, batches, cfg.global_batch_size)
        rates = alternate(steppers, seconds)
        runs += [{"units": units, "stem": "conv", "captions_per_image": k,
                  "examples_per_s": rates[k]} for k in (0, 4)]
        runs[-1]["speedup"] = rates[4] / rates[0]
    return runs


def child(*args: str) -> dict | list:
    """Runs this file with `args` in a new process and returns the JSON it prints."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--quickstart", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image_major", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        precision, replicas = args.child
        print(json.dumps(measure(precision, int(replicas), args.seconds)))
    elif args.quickstart:
        print(json.dumps(quickstart(args.quickstart, args.seconds)))
    elif args.probe:
        print(json.dumps(xla_probe(args.seconds)))
    elif args.image_major:
        print(json.dumps(image_major(args.seconds)))
    else:
        seconds = ["--seconds", str(args.seconds)]
        rows = []
        for precision, replicas in CONFIGS:
            rows += child(*seconds, "--child", precision, str(replicas))
            print(json.dumps(rows[-3:]), file=sys.stderr)
        quick = [row for precision in ("float32", "mixed_bfloat16")
                 for row in child(*seconds, "--quickstart", precision)]
        print(json.dumps(quick), file=sys.stderr)
        result = {"model": {**MODEL, "feature_grid": GRID, "vocab": VOCAB},
                  "quickstart_model": {**QUICKSTART, "feature_grid": GRID,
                                       "vocab": QUICKSTART_VOCAB},
                  "cpus": os.cpu_count(), "runs": rows, "quickstart": quick,
                  "xla_probe": child(*seconds, "--probe"),
                  "image_major": child(*seconds, "--image_major")}
        publish("train_step", result)


if __name__ == "__main__":
    main()
