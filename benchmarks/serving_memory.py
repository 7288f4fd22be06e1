"""Resident memory of the local server: no model, one version, and the peak of a hot reload
(the new version loaded and warmed up while the old one still serves), and the Kubernetes memory
request and limit derived from them.

    .venv/bin/python benchmarks/serving_memory.py [--export exports/caption/3]

The `bench_model.py` export (the quickstart's decoder size, warm-up records at every default
`--warmup_batch_sizes`) is served by `python -m serving.local_server`, which loads it through a
Session as TensorFlow Serving's SavedModelBundle does. The server is started on an empty base
path (TensorFlow, gRPC and the server imported, no model: the baseline), version 1 is then
renamed in (loaded and warmed up: one version), then version 2 (a hot reload: two versions
until the old one is unloaded), then version 3 (a second reload: does memory keep growing?).
VmRSS is sampled every 20 ms from /proc. `--export` measures your own export version instead.
Writes benchmarks/results/serving_memory.json, including `memory_settings`: the request is the
one-version RSS with REQUEST_HEADROOM, the limit the hot-reload peak with LIMIT_HEADROOM, each
rounded up to 64 MiB. k8s/serving/base/deployment.yaml carries them (a test checks).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench_model import CONFIG, DESCRIPTION, endless_model, module  # noqa: E402
from results_file import publish  # noqa: E402

from dist_caption import exporting  # noqa: E402
from serving.local_server import process  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST_HEADROOM = 1.25  # steady state: request activations, allocator slack
LIMIT_HEADROOM = 1.5  # over the hot-reload peak: concurrent batches of 64, fragmentation
MIB = 1 << 20


def memory_settings(result: dict) -> dict:
    """The container's memory request and limit ("<n>Mi") from a serving_memory result."""
    def mi(value_mib: float) -> str:
        return f"{64 * math.ceil(value_mib / 64)}Mi"

    return {"requests": mi(result["one_version_rss_mib"] * REQUEST_HEADROOM),
            "limits": mi(result["hot_reload_peak_mib"] * LIMIT_HEADROOM)}


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Sampler(threading.Thread):
    """The highest VmRSS of `pid` seen since the last `reset`."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.high, self.stop = pid, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.high = max(self.high, status_kib(self.pid, "VmRSS"))

    def reset(self) -> None:
        self.high = status_kib(self.pid, "VmRSS")


def version_states(port: int) -> dict[int, str]:
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "caption"
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            request, timeout=30)
    return {s.version: get_model_status_pb2.ModelVersionStatus.State.Name(s.state)
            for s in response.model_version_status}


def settle(pid: int, seconds: float = 3.0) -> int:
    """VmRSS (KiB) once the process has been idle for `seconds`."""
    time.sleep(seconds)
    return status_kib(pid, "VmRSS")


def add_version(staged: str, tmp: str, base: str, version: int) -> None:
    """Copies `staged` in as `<base>/<version>` with one rename, as serving.publish does."""
    shutil.copytree(staged, os.path.join(tmp, f"v{version}"))
    os.rename(os.path.join(tmp, f"v{version}"), os.path.join(base, str(version)))


def reload(proc, sampler: Sampler, staged: str, tmp: str, base: str, port: int,
           version: int) -> int:
    """Adds `version`, waits until the previous one is unloaded; the highest VmRSS (KiB)."""
    sampler.reset()
    add_version(staged, tmp, base, version)
    while version_states(port).get(version - 1) != "END":
        time.sleep(0.05)
    return max(sampler.high, status_kib(proc.pid, "VmRSS"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", help="an export version folder (default: bench_model.py's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, "staged")
        if args.export:
            shutil.copytree(args.export, staged)
        else:
            exporting.save(module(endless_model(), xla=False), staged)
            exporting.write_warmup(staged, exporting.warmup_requests(
                "caption", 64, CONFIG.feature_shape))
        size_mib = sum(os.path.getsize(os.path.join(p, n)) for p, _, names in os.walk(staged)
                       for n in names) / MIB
        base, ready = os.path.join(tmp, "caption"), os.path.join(tmp, "ready.json")
        os.makedirs(base)
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.local_server", f"--model_base_path={base}",
             "--port=0", "--poll_seconds=0.2", f"--ready_file={ready}"], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # Started by hand, not with process.start: the baseline is measured before the
            # first version is added, while the server waits for one.
            baseline = settle(proc.pid, 8.0)
            sampler = Sampler(proc.pid)
            add_version(staged, tmp, base, 1)
            port = process.wait(ready, proc)["port"]
            first_load_peak = sampler.high
            one = settle(proc.pid)
            reload_peak = reload(proc, sampler, staged, tmp, base, port, 2)
            after = settle(proc.pid)
            second_peak = reload(proc, sampler, staged, tmp, base, port, 3)
            after_second = settle(proc.pid)
            sampler.stop.set()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    kib = 1024
    result = {"model": args.export or DESCRIPTION, "savedmodel_mib": round(size_mib, 1),
              "server": "python -m serving.local_server (Session path, as SavedModelBundle)",
              "baseline_rss_mib": round(baseline / kib),
              "first_load_peak_mib": round(first_load_peak / kib),
              "one_version_rss_mib": round(one / kib),
              "hot_reload_peak_mib": round(max(reload_peak, second_peak) / kib),
              "first_reload_peak_mib": round(reload_peak / kib),
              "after_reload_rss_mib": round(after / kib),
              "second_reload_peak_mib": round(second_peak / kib),
              "after_second_reload_rss_mib": round(after_second / kib),
              "one_version_delta_mib": round((one - baseline) / kib),
              "hot_reload_delta_mib": round((max(reload_peak, second_peak) - baseline) / kib),
              "headroom": {"requests": REQUEST_HEADROOM, "limits": LIMIT_HEADROOM}}
    result["memory_settings"] = memory_settings(result)
    publish("serving_memory", result)


if __name__ == "__main__":
    main()
