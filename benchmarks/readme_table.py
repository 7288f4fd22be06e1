"""Writes the benchmark tables of docs/performance.md from benchmarks/results/*.json, so the two agree.

    .venv/bin/python benchmarks/readme_table.py          # rewrite the section
    .venv/bin/python benchmarks/readme_table.py --check  # exit 1 if it is stale

The section lies between `<!-- benchmarks:start -->` and `<!-- benchmarks:end -->`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "docs", "performance.md")
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def _load(name: str) -> dict | None:
    path = os.path.join(HERE, "results", f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def decode_table(d: dict) -> list[str]:
    lines = [f"Decoding (`benchmarks/decode.py`): 20-token captions from JPEG bytes, the "
             f"quickstart's decoder size (linear stem); this machine's float32 matmul rate in "
             f"the same run: {d['machine']['matmul_gflops']:.0f} GFLOP/s.", "",
             "| batch | cached: captions/s (p50 / p99 ms) | cached + XLA | recompute "
             "(tutorials) | cached / recompute | XLA / recompute | decoder GFLOP/s (share of "
             "matmul): cached, XLA |", "|---|---|---|---|---|---|---|"]
    def cell(r: dict) -> str:
        return f"{r['captions_per_s']:.1f} ({r['p50_ms']:.1f} / {r['p99_ms']:.1f})"

    for batch, row in d["batch"].items():
        speed, rate, share = d["speedup"][batch], d["decoder_gflops"][batch], \
            d["share_of_matmul_rate"][batch]
        lines.append(f"| {batch} | {cell(row['cached'])} | {cell(row['cached_xla'])} | "
                     f"{cell(row['recompute'])} | {speed['cached']:.1f}x | "
                     f"{speed['cached_xla']:.1f}x | {rate['cached']:.1f} ({share['cached']:.0%}),"
                     f" {rate['cached_xla']:.1f} ({share['cached_xla']:.0%}) |")
    return lines


def train_table(d: dict, pipeline: dict | None) -> list[str]:
    runs = {(r["replicas"], r["precision"], r["mode"]): r for r in d["runs"]}
    lines = ["Training step (`benchmarks/train_step.py`): the trainer's step on one fixed batch, "
             "Transformer 2 x 256 (linear stem), global batch 64, 23 target tokens per caption; "
             "examples/s (tokens/s).", "",
             "| replicas | precision | eager | tf.function | XLA |", "|---|---|---|---|---|"]
    for replicas, precision in sorted({(k[0], k[1]) for k in runs}):
        cells = [f"{runs[(replicas, precision, m)]['examples_per_s']:.0f} "
                 f"({runs[(replicas, precision, m)]['tokens_per_s']:.0f})"
                 for m in ("eager", "function", "xla")]
        name = "1" if replicas == 1 else f"{replicas} (MirroredStrategy, logical CPUs)"
        lines.append(f"| {name} | {precision} | " + " | ".join(cells) + " |")
    quick = d.get("quickstart")
    if quick:
        m = d["quickstart_model"]
        lines += ["", f"The quickstart's model as it was when measured (width {m['units']}, "
                      f"conv stem, {m.get('encoder_layers', 0)} encoder layers, "
                      f"vocabulary {m['vocab']}, `--captions_per_image "
                      f"{m['captions_per_image']}`, global batch {m['global_batch_size']}, one "
                      f"process), tf.function and XLA alternated in one run per precision; "
                      f"examples/s:", "",
                  "| precision | dropout | tf.function | XLA | XLA / tf.function |",
                  "|---|---|---|---|---|"]
        for r in quick:
            lines.append(f"| {r['precision']} | {r['dropout']:g} | "
                         f"{r['function_examples_per_s']:.0f} | {r['xla_examples_per_s']:.0f} | "
                         f"{r['xla_over_function']:.2f}x |")
    probe = d.get("xla_probe")
    if probe and "dropout_mask_ms" in probe:
        mm, stem, mask = probe["matmul_gflops"], probe["stem_forward_backward_ms"], \
            probe["dropout_mask_ms"]
        shape = " x ".join(str(s) for s in probe["matmul_shape"])
        lines += ["", f"What decides XLA's speed on this CPU (`xla_probe`, plain tf.function vs "
                      f"XLA): float32 matmuls ({shape}) {mm['float32']['function']:.0f} vs "
                      f"{mm['float32']['xla']:.0f} GFLOP/s, but bfloat16 ones "
                      f"{mm['bfloat16']['function']:.0f} vs {mm['bfloat16']['xla']:.0f} "
                      f"GFLOP/s (TensorFlow's oneDNN kernels use AVX512-BF16, XLA's do not); "
                      f"the conv stem's forward + backward pass {stem['function']:.1f} vs "
                      f"{stem['xla']:.1f} ms, so the trainer runs the stem outside XLA; a "
                      f"dropout mask from TensorFlow's stateless random numbers "
                      f"{mask['tensorflow_stateless']['function']:.2f} vs "
                      f"{mask['tensorflow_stateless']['xla']:.2f} ms, from `HashDropout` "
                      f"{mask['hash']['function']:.2f} vs {mask['hash']['xla']:.2f} ms."]
    grouped = d.get("image_major")
    if grouped:
        lines += ["", "Image-major batches (`--captions_per_image 4`: each image encoded once "
                      "for 4 of its captions), the quickstart's model (conv stem), one process, "
                      "float32, tf.function, alternated in one run:", "",
                  "| width | one row per caption | `--captions_per_image 4` | speed-up |",
                  "|---|---|---|---|"]
        for one, four in zip(grouped[::2], grouped[1::2]):
            lines.append(f"| {one['units']} | {one['examples_per_s']:.0f} | "
                         f"{four['examples_per_s']:.0f} | {four['speedup']:.2f}x |")
    if pipeline:
        best = max(r["examples_per_s"] for r in d["runs"])
        rate = pipeline["read_patches_cache"]["examples_per_s"]
        lines += ["", f"Input pipeline (`benchmarks/input_pipeline.py`): {rate:,.0f} examples/s "
                      f"from the feature cache, {rate / best:.0f}x the fastest step's "
                      f"{best:.0f} examples/s (separate runs): training never waits for input."]
    return lines


def trajectory_table(d: dict) -> list[str]:
    stage = ", ".join(f"`--{k} {v:g}`" if isinstance(v, float) else f"`--{k} {v}`"
                      for k, v in d["stage"].items())
    lines = ["Training trajectories (`benchmarks/trajectory.py`): the quickstart's cross-entropy "
             f"stage as it was when measured ({stage}) in one process, three runs from the "
             "same weights over the same batches: plain, plain with the vocabulary logits' "
             "kernel nudged by one ulp (x (1 + 1e-7)), and XLA; the distance of each run's "
             "weights from the plain run's (relative to their norm), and the mean training loss "
             "of the last 100 steps.", "",
             "| step | nudged: distance | XLA: distance | loss: plain | nudged | XLA |",
             "|---|---|---|---|---|---|"]
    for m in d["marks"]:
        if m["step"] < 10:
            continue
        far, loss = m["distance_from_plain"], m["mean_loss_last_100"]
        lines.append(f"| {m['step']} | {far['nudged']:.1e} | {far['xla']:.1e} | "
                     f"{loss['plain']:.3f} | {loss['nudged']:.3f} | {loss['xla']:.3f} |")
    return lines


def multi_worker_table(d: dict) -> list[str]:
    lines = ["Multi-worker (`benchmarks/multi_worker.py`): N local worker processes "
             "(MultiWorkerMirroredStrategy over loopback) share the 2 cores; global batch 64.",
             "", "| workers | step ms | gradient all-reduce ms | share of the step | "
             "MB all-reduced per step | examples/s |", "|---|---|---|---|---|---|"]
    for r in d["runs"]:
        lines.append(f"| {r['workers']} | {r['step_ms']:.0f} | {r['all_reduce_ms']:.0f} | "
                     f"{r['all_reduce_share']:.0%} | {r['bytes_all_reduced'] / 1e6:.1f} | "
                     f"{r['examples_per_s']:.0f} |")
    e = d["scaling_estimate"]
    a = e["assumptions"]
    lines += ["", f"Scaling estimate (ring all-reduce of those bytes, no overlap; assumed "
                  f"{a['nvlink_GB_per_s']:.0f} GB/s NVLink inside a host, "
                  f"{a['network_GB_per_s_per_host']:.1f} GB/s between hosts, "
                  f"{a['gpu_tflops_sustained']:.0f} TFLOP/s sustained per GPU, "
                  f"{a['captions_per_gpu']} captions per GPU = {a['gpu_step_ms']:.2f} ms of "
                  f"compute per step): 8 GPUs in one host spend "
                  f"{e['8_gpus_1_host']['all_reduce_ms']:.2f} ms per step all-reducing "
                  f"({e['8_gpus_1_host']['scaling_efficiency']:.0%} efficiency); 4 hosts x 8 "
                  f"GPUs {e['32_gpus_4_hosts']['all_reduce_ms']:.2f} ms "
                  f"({e['32_gpus_4_hosts']['scaling_efficiency']:.0%}). This model is small "
                  f"for its gradient: across hosts, raise the per-GPU batch."]
    return lines


def serving_table(d: dict) -> list[str]:
    ref = d["signature_batch1_p50_ms"]
    lines = [f"Serving (`benchmarks/serving_load.py`): `serving.client` over gRPC against "
             f"`serving.local_server`, one image per request; the signature alone answers one "
             f"image in {ref:.1f} ms (median).", "",
             "| concurrency | batching: requests/s | p50 ms | p99 ms (x signature p50) | "
             "no batching: requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    for c, b in d["batching"].items():
        n = d["no_batching"][c]
        lines.append(f"| {c} | {b['requests_per_s']:.0f} | {b['p50_ms']:.1f} | "
                     f"{b['p99_ms']:.1f} ({b['p99_ms'] / ref:.1f}x) | {n['requests_per_s']:.0f} "
                     f"| {n['p50_ms']:.1f} | {n['p99_ms']:.1f} |")
    return lines


NO_GPU_RESULTS = ("GPU: not measured yet. `bash launch/gpu_check.sh` on a GPU host writes "
                  "`benchmarks/results/gpu-<gpu name>.json`; `benchmarks/readme_table.py` "
                  "then adds its tables here.")


def gpu_table(d: dict) -> list[str]:
    """The tables of one `launch/gpu_check.sh` result: training on 1 and all GPUs, decoding."""
    t, tf = d["training"], d["tensorflow"]
    lines = [f"GPU (`bash launch/gpu_check.sh`): {d['gpus']} x {d['gpu']} (driver "
             f"{d['driver']}), TensorFlow {tf['version']} (CUDA {tf['cuda']}, cuDNN "
             f"{tf['cudnn']}). Training: `launch/train.sh --workers 1` (MirroredStrategy over "
             f"the GPUs), {t['model']}, {t['per_gpu_batch']} captions per GPU, "
             f"{t['precision']}, {'XLA' if t['xla'] else 'no XLA'}; the trainer's rate over the "
             f"second epoch of {t['steps_per_epoch']} steps.", "",
             "| GPUs | global batch | examples/s | scaling efficiency |", "|---|---|---|---|"]
    one = t["runs"][0]["examples_per_s"]
    for r in t["runs"]:
        lines.append(f"| {r['gpus']} | {r['global_batch']} | {r['examples_per_s']:,.0f} | "
                     f"{r['examples_per_s'] / (r['gpus'] * one):.0%} |")
    return lines + [""] + decode_table(d["decode"])


def targets_table(decode: dict | None, train: dict | None, pipeline: dict | None,
                  serving: dict | None) -> list[str]:
    """The performance targets, each with the measured figure and whether it is met."""
    rows = []
    if decode:
        for batch, path, want in (("64", "cached", 8), ("1", "cached", 5),
                                  ("64", "cached_xla", 9)):
            speed = decode["speedup"][batch][path]
            name = "KV-cached decoding" + (", XLA export," if path == "cached_xla" else "")
            rows.append((f"{name} >= {want}x recomputation, batch {batch}", f"{speed:.1f}x",
                         speed >= want))
        share = decode["share_of_matmul_rate"]["64"]
        rows.append(("decoder >= 20% of the matmul rate at batch 64",
                     f"{share['cached']:.0%}, XLA {share['cached_xla']:.0%}",
                     max(share.values()) >= 0.2))
    if train and pipeline:
        best = max(r["examples_per_s"] for r in train["runs"])
        ratio = pipeline["read_patches_cache"]["examples_per_s"] / best
        rows.append(("input pipeline >= 5x the step's consumption", f"{ratio:.0f}x", ratio >= 5))
    if train:
        for precision in ("float32", "mixed_bfloat16"):
            ratios = [r["xla_over_function"] for r in train["quickstart"]
                      if r["precision"] == precision]
            rows.append((f"XLA train step >= tf.function, quickstart model, {precision}"
                         f", dropout 0 and 0.1", ", ".join(f"{r:.2f}x" for r in ratios),
                         True if min(ratios) >= 1 else "explained below"))
    if serving:
        ratio = serving["p99_over_signature_p50"]["batching"]["8"]
        rows.append(("serving p99 at concurrency 8 < 3x the signature's batch-1 median",
                     f"{ratio:.1f}x (batching)", ratio < 3))
    mark = {True: "met", False: "not met"}
    return ["| target | measured | |", "|---|---|---|"] + [
        f"| {name} | {value} | {mark.get(ok, ok)} |" for name, value, ok in rows]


FAULT_NAMES = {"kill_worker": "SIGKILL worker 1", "kill_chief": "SIGKILL worker 0 (the chief)",
               "link_down": "worker 1's link down, up 20 s later", "stall": "SIGSTOP worker 1"}


def faults_table(d: dict) -> list[str]:
    ref = d["reference"]
    lines = [f"Faults (`benchmarks/faults.py`, as root): {d['workers']} workers, each in its own "
             f"network namespace with its own address, trained by the launcher's restart loop "
             f"(`--max_restarts 2`) for {ref['final_step']} steps with a checkpoint every "
             f"{d['checkpoint_every']}; the fault comes half an interval after the first "
             f"checkpoint; the trainer's and the launcher's default timeouts "
             f"(`--heartbeat_timeout 30`, `--failure_grace_seconds 15`). Uninterrupted: "
             f"{ref['wall_s']:.0f} s, {ref['steps_per_s']:.1f} steps/s. Noticed: until the "
             f"first worker other than the one faulted exits; gone: until every process "
             f"of that group has exited; steps lost: trained after the checkpoint resumed from "
             f"(time since that checkpoint x the step rate).", "",
             "| fault | noticed | group gone | hung | resumed from (latest at fault) | steps "
             "lost | restarts | exit | weights = uninterrupted | wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        lines.append(
            f"| {FAULT_NAMES.get(r['fault'], r['fault'])} | {r['noticed_s']:.1f} s | "
            f"{r['group_gone_s']:.1f} s | {'yes' if r['hung'] else 'no'} | "
            f"{r['resumed_from']} ({r['latest_checkpoint_at_fault']}) | {r['steps_lost']} | "
            f"{r['restarts']} | {r['exit_status']} | {'yes' if r['weights_equal'] else 'NO'} | "
            f"{r['wall_s']:.0f} s |")
    return lines


def section() -> str:
    parts = []
    for name, render in (("decode", decode_table), ("multi_worker", multi_worker_table),
                         ("faults", faults_table), ("serving_load", serving_table)):
        data = _load(name)
        if data:
            parts.append("\n".join(render(data)))
    train = _load("train_step")
    if train:
        parts.insert(1, "\n".join(train_table(train, _load("input_pipeline"))))
    trajectory = _load("trajectory")
    if trajectory:
        parts.insert(2 if train else 1, "\n".join(trajectory_table(trajectory)))
    parts.insert(0, "\n".join(targets_table(_load("decode"), train, _load("input_pipeline"),
                                            _load("serving_load"))))
    gpu_files = sorted(glob.glob(os.path.join(HERE, "results", "gpu-*.json")))
    for path in gpu_files:
        parts.append("\n".join(gpu_table(_load(os.path.basename(path)[:-len(".json")]))))
    if not gpu_files:
        parts.append(NO_GPU_RESULTS)
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    with open(README, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{section()}\n{END}{tail}"
    if args.check:
        sys.exit(0 if new == text else 1)
    with open(README, "w", encoding="utf-8") as f:
        f.write(new)


if __name__ == "__main__":
    main()
