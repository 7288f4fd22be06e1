"""Multi-worker training: time per step, and the share of it spent in the gradient all-reduce,
for 1, 2 and 4 local worker processes (MultiWorkerMirroredStrategy over loopback gRPC).

    .venv/bin/python benchmarks/multi_worker.py [--steps 30]

Each configuration is a real `python -m dist_caption.launch --workers N` run of this file as the
worker module, with the trainer's own Stepper on the `train_step.py` model (global batch 64,
split over the workers; the 2 cores are split between them too). Each worker measures the full
step, then an all-reduce alone of tensors shaped like the gradients (the bytes one step
all-reduces), in the same process. From the measured bytes, `scaling_estimate` projects the
all-reduce time for 8 GPUs in one host and 4 hosts x 8 GPUs under stated bandwidths. Writes
benchmarks/results/multi_worker.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKERS = (1, 2, 4)
# Stated assumptions of the scaling estimate (bytes/s of all-reduce bus bandwidth).
NVLINK_BYTES_PER_S = 100e9  # ring all-reduce inside one 8-GPU host (NVLink, conservative)
NETWORK_BYTES_PER_S = 12.5e9  # between hosts: 100 Gbit/s Ethernet/InfiniBand per host
GPU_FLOPS = 25e12  # sustained float16 rate of one A100-class GPU on this small model (~8% of peak)
GPU_BATCH = 64  # captions per GPU per step (weak scaling: the global batch grows with GPUs)


def worker(calls: int, out: str) -> None:
    """One worker: step time, then all-reduce time of gradient-shaped tensors."""
    import tensorflow as tf

    from dist_caption import cluster, training
    from train_step import setup

    strategy = training.make_strategy("auto")
    cfg, stepper, batches = setup(strategy, "float32", xla=False)
    stop = tf.constant(0.0)

    def timed(fn, warmup: int = 3) -> float:
        # A fixed count, the same on every worker: each call is a collective.
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    step_s = timed(lambda: float(stepper.train_step(batches, stop)["loss"]))
    grads = [tf.zeros(v.shape, v.dtype) for v in stepper.model.trainable_variables]

    @tf.function
    def all_reduce():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        return strategy.run(replica_fn)

    reduce_s = timed(lambda: [t.numpy() for t in strategy.experimental_local_results(
        all_reduce())[0][:1]]) if strategy.num_replicas_in_sync > 1 else 0.0
    size = sum(int(tf.size(g)) * g.dtype.size for g in grads)
    if cluster.task_index(os.environ) == 0:
        with open(out, "w") as f:
            json.dump({"workers": strategy.num_replicas_in_sync, "step_ms": 1e3 * step_s,
                       "all_reduce_ms": 1e3 * reduce_s, "all_reduce_share": reduce_s / step_s,
                       "bytes_all_reduced": size,
                       "examples_per_s": cfg.global_batch_size / step_s}, f)


def scaling_estimate(bytes_per_step: int) -> dict:
    """All-reduce time per step for 8 GPUs in a host and 4 hosts x 8 GPUs (ring algorithms),
    against one GPU's compute for its batch: 3 x the forward FLOPs (forward + backward) of
    `GPU_BATCH` teacher-forced captions at `GPU_FLOPS`."""
    import dataclasses

    from bench_model import CONFIG, flops_per_caption
    from train_step import MODEL

    config = dataclasses.replace(CONFIG, max_len=MODEL["max_len"])
    forward = flops_per_caption(config, tokens=config.max_len - 1)["caption"]
    gpu_step_ms = 3 * forward * GPU_BATCH / GPU_FLOPS * 1e3

    def ring(n: int, bandwidth: float) -> float:
        return 2 * (n - 1) / n * bytes_per_step / bandwidth * 1e3

    one_host = ring(8, NVLINK_BYTES_PER_S)
    # Hierarchical: reduce inside each host over NVLink, all-reduce across hosts, broadcast.
    four_hosts = 2 * ring(8, NVLINK_BYTES_PER_S) + ring(4, NETWORK_BYTES_PER_S)
    return {
        "assumptions": {"nvlink_GB_per_s": NVLINK_BYTES_PER_S / 1e9,
                        "network_GB_per_s_per_host": NETWORK_BYTES_PER_S / 1e9,
                        "gpu_tflops_sustained": GPU_FLOPS / 1e12, "captions_per_gpu": GPU_BATCH,
                        "gpu_step_ms": round(gpu_step_ms, 3),
                        "overlap": "none (one all-reduce after the backward pass)"},
        "8_gpus_1_host": {"all_reduce_ms": round(one_host, 3), "scaling_efficiency": round(
            gpu_step_ms / (gpu_step_ms + one_host), 3)},
        "32_gpus_4_hosts": {"all_reduce_ms": round(four_hosts, 3), "scaling_efficiency": round(
            gpu_step_ms / (gpu_step_ms + four_hosts), 3)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="Timed steps per configuration.")
    parser.add_argument("--worker_out", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker_out:
        worker(args.steps, args.worker_out)
        return
    from results_file import publish

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in WORKERS:
            out = os.path.join(tmp, f"{n}.json")
            env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                   ""),
                   "TF_CPP_MIN_LOG_LEVEL": "2"}
            subprocess.run([sys.executable, "-m", "dist_caption.launch", "--workers", str(n),
                            "--module", "multi_worker", "--no_prepare", "--cpu",
                            f"--steps={args.steps}", f"--worker_out={out}"],
                           cwd=ROOT, env=env, check=True, capture_output=True, text=True)
            with open(out) as f:
                rows.append(json.load(f))
            print(json.dumps(rows[-1]), flush=True)
    publish("multi_worker", {"runs": rows,
                             "scaling_estimate": scaling_estimate(rows[-1]["bytes_all_reduced"])})


if __name__ == "__main__":
    main()
