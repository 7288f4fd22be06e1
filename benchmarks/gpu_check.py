"""Verifies a GPU host: the driver and the GPUs TensorFlow sees, a short training run on one
GPU and on all of them (examples/s, scaling efficiency), and the decoding benchmark (plain and
XLA exports) on one GPU.

    bash launch/gpu_check.sh [--steps 200] [--per_gpu_batch 128]

Without a GPU it says so in one line and exits 0, measuring nothing. Otherwise it writes
benchmarks/results/gpu-<gpu name>.json and prints the tables `readme_table.py` puts in the
README. Training uses `launch/train.sh --workers 1` (one process, MirroredStrategy over its
GPUs) on a 2,000-scene synthetic dataset kept in runs/gpu_check/ (made on the first run), with
the quickstart's model; the rate is the trainer's own over the second epoch (the first one
traces and compiles the step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from readme_table import gpu_table  # noqa: E402
from results_file import publish  # noqa: E402

from dist_caption import launching  # noqa: E402

WORK = os.path.join(ROOT, "runs", "gpu_check")
MODEL = ["--units", "128", "--captions_per_image", "4", "--dropout", "0"]
MODEL_DESCRIPTION = "the quickstart's model (Transformer 2 x 128, conv stem, 4 captions per image)"
DATA = ["--synthetic_dir", os.path.join(WORK, "synthetic"), "--num_images", "2000",
        "--cache_dir", os.path.join(WORK, "cache")]
TF_PROBE = ("import json, tensorflow as tf; b = tf.sysconfig.get_build_info(); "
            "print(json.dumps({'gpus': len(tf.config.list_physical_devices('GPU')), "
            "'version': tf.__version__, 'cuda': b.get('cuda_version'), "
            "'cudnn': b.get('cudnn_version')}))")


def die(message: str, code: int = 1) -> None:
    print(f"gpu_check: error: {message}", file=sys.stderr)
    sys.exit(code)


def with_gpus(gpus: list[str]) -> dict[str, str]:
    """This process's environment with only `gpus` visible."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}


def driver_and_gpus() -> tuple[str, list[str]]:
    """The driver version and the name of every GPU, from nvidia-smi."""
    result = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                             "--format=csv,noheader"], capture_output=True, text=True,
                            timeout=60)
    if result.returncode:
        die(f"nvidia-smi --query-gpu failed: {result.stderr.strip() or result.stdout.strip()}")
    rows = [[c.strip() for c in line.split(",")] for line in result.stdout.splitlines() if line]
    return rows[0][1], [row[0] for row in rows]


def tensorflow_on(gpus: list[str]) -> dict:
    """What TensorFlow sees with `gpus` visible: its version, CUDA, cuDNN, GPU count."""
    result = subprocess.run([sys.executable, "-c", TF_PROBE], env=with_gpus(gpus),
                            capture_output=True, text=True, timeout=300)
    if result.returncode:
        die(f"TensorFlow does not start: {result.stderr.strip().splitlines()[-1]}")
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    if seen["gpus"] != len(gpus):
        die(f"{len(gpus)} GPUs visible but TensorFlow {seen['version']} sees {seen['gpus']}: "
            f"install TensorFlow with its CUDA libraries (bash launch/setup.sh --gpu)")
    return seen


def train_rate(gpus: list[str], steps: int, per_gpu_batch: int) -> dict:
    """examples/s of `launch/train.sh --workers 1` on `gpus`, over its second epoch."""
    from dist_caption import training

    model_dir = os.path.join(WORK, f"run-{len(gpus)}gpu")
    shutil.rmtree(model_dir, ignore_errors=True)  # a finished run would just resume and stop
    batch = per_gpu_batch * len(gpus)
    command = ["bash", os.path.join(ROOT, "launch", "train.sh"), "--workers", "1", "--prepare",
               *DATA, *MODEL, "--model_dir", model_dir, "--global_batch_size", str(batch),
               "--epochs", "2", "--steps_per_epoch", str(steps), "--log_every", str(steps),
               "--eval_images", "0", "--patience", "0"]
    print(f"gpu_check: training on {len(gpus)} GPU(s): " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, env=with_gpus(gpus))
    if result.returncode:
        die(f"training on {len(gpus)} GPU(s) exited with {result.returncode}", result.returncode)
    rates = training.logged_scalars(model_dir, "train/examples_per_second")
    return {"gpus": len(gpus), "global_batch": batch, "examples_per_s": rates[2 * steps]}


def decode_on(gpu: str, seconds: float) -> dict:
    """benchmarks/decode.py (cached, cached + XLA, recomputed) on one GPU."""
    out = os.path.join(WORK, "decode.json")
    print("gpu_check: decoding benchmark on one GPU", flush=True)
    result = subprocess.run([sys.executable, os.path.join(HERE, "decode.py"), "--seconds",
                             str(seconds), "--out", out], env=with_gpus([gpu]),
                            stdout=subprocess.DEVNULL)
    if result.returncode:
        die(f"benchmarks/decode.py exited with {result.returncode}", result.returncode)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="Steps per epoch (2 epochs).")
    parser.add_argument("--per_gpu_batch", type=int, default=128,
                        help="Captions per GPU per step (a multiple of 4).")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="Seconds per configuration of the decoding benchmark.")
    args = parser.parse_args()
    if args.steps < 1 or args.per_gpu_batch < 4 or args.per_gpu_batch % 4:
        die("--steps must be positive and --per_gpu_batch a positive multiple of 4", 2)

    gpus = launching.host_gpus(os.environ)
    if not gpus:
        where = (f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} names none"
                 if "CUDA_VISIBLE_DEVICES" in os.environ else
                 "nvidia-smi -L lists none, or there is no NVIDIA driver")
        print(f"gpu_check: no GPU on this machine ({where}): nothing measured")
        return
    driver, names = driver_and_gpus()
    name = names[0]
    print(f"gpu_check: driver {driver}; {len(gpus)} GPU(s) visible: {', '.join(names)}")
    seen = tensorflow_on(gpus)
    print(f"gpu_check: TensorFlow {seen['version']} (CUDA {seen['cuda']}, cuDNN "
          f"{seen['cudnn']}) sees {seen['gpus']} GPU(s)", flush=True)

    from dist_caption import training

    precision, xla = training.choose_precision_and_xla("auto", "auto", gpus)
    runs = [train_rate(gpus[:1], args.steps, args.per_gpu_batch)]
    if len(gpus) > 1:
        runs.append(train_rate(gpus, args.steps, args.per_gpu_batch))
    result = {
        "gpu": name, "gpus": len(gpus), "driver": driver, "all_gpu_names": names,
        "tensorflow": seen,
        "training": {"model": MODEL_DESCRIPTION, "flags": MODEL, "precision": precision,
                     "xla": xla, "per_gpu_batch": args.per_gpu_batch,
                     "steps_per_epoch": args.steps, "runs": runs,
                     "scaling_efficiency": runs[-1]["examples_per_s"]
                     / (runs[-1]["gpus"] * runs[0]["examples_per_s"])},
        "decode": decode_on(gpus[0], args.seconds),
    }
    publish("gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), result)
    print("\n".join(gpu_table(result)))


if __name__ == "__main__":
    main()
