"""First request after a load against steady state, for an --export_xla model on the local
server with the XLA overlays' batching (allowed_batch_sizes), with and without warm-up records.

    .venv/bin/python benchmarks/serving_warmup.py [--steady 5]

The `bench_model.py` export compiled with XLA is served by `python -m serving.local_server
--enable_batching --batching_parameters_file=k8s/serving/components/xla-batching/batching.config
--xla_cpu_compilation_enabled`, once with the warm-up records `--warmup_batch_sizes` writes by
default (every allowed size) and once with no warm-up file. One client then sends requests of
1, 3, 12 and 64 images (run as batches of 1, 4, 16 and 64): the first request of each size,
then `--steady` more, whose median is the steady state. Also the seconds from the server's start
to serving (the warm-up's compilations happen there). Writes
benchmarks/results/serving_warmup.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench_model import CONFIG, DESCRIPTION, endless_model, module  # noqa: E402
from results_file import publish  # noqa: E402

from dist_caption import exporting  # noqa: E402
from serving.client import CaptionClient  # noqa: E402
from serving.local_server import process  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHING = os.path.join(ROOT, "k8s", "serving", "components", "xla-batching",
                        "batching.config")
REQUEST_SIZES = (1, 3, 12, 64)


def start_server(base: str, tmp: str) -> tuple[subprocess.Popen, str, float]:
    """The local server on `base` as the XLA overlay runs TF Serving: (process, address,
    seconds from start to serving)."""
    ready = os.path.join(tmp, f"ready-{time.monotonic_ns()}.json")
    start = time.perf_counter()
    proc, ports = process.start(
        [f"--model_base_path={base}", "--port=0", "--enable_batching",
         f"--batching_parameters_file={BATCHING}", "--xla_cpu_compilation_enabled"], ready,
        timeout=1800)
    return proc, f"localhost:{ports['port']}", round(time.perf_counter() - start, 1)


def first_and_steady(server: str, image: bytes, steady: int) -> dict:
    """Per request size: the first request's ms, the median of `steady` more, their ratio."""
    rows = {}
    with CaptionClient(server, timeout=600) as client:
        for size in REQUEST_SIZES:
            times = []
            for _ in range(1 + steady):
                start = time.perf_counter()
                client.caption([image] * size)
                times.append(1e3 * (time.perf_counter() - start))
            median = float(np.median(times[1:]))
            rows[str(size)] = {"first_ms": round(times[0], 1), "steady_ms": round(median, 1),
                               "first_over_steady": round(times[0] / median, 1)}
            print(size, rows[str(size)], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady", type=int, default=5)
    args = parser.parse_args()

    image = exporting.warmup_image()
    result = {"model": DESCRIPTION, "machine": {"cpus": os.cpu_count()},
              "batching_parameters_file": os.path.relpath(BATCHING, ROOT),
              "request_sizes": list(REQUEST_SIZES),
              "warmup_batch_sizes": list(exporting.DEFAULT_WARMUP_BATCH_SIZES)}
    with tempfile.TemporaryDirectory() as tmp:
        warm, cold = os.path.join(tmp, "warm", "caption"), os.path.join(tmp, "cold", "caption")
        exporting.save(module(endless_model(), xla=True), os.path.join(cold, "1"))
        shutil.copytree(os.path.join(cold, "1"), os.path.join(warm, "1"))
        exporting.write_warmup(os.path.join(warm, "1"), exporting.warmup_requests(
            "caption", 64, CONFIG.feature_shape, exporting.DEFAULT_WARMUP_BATCH_SIZES, xla=True))
        for name, base in (("with_warmup", warm), ("without_warmup", cold)):
            proc, server, load_s = start_server(base, tmp)
            try:
                result[name] = {"start_to_serving_s": load_s,
                                "requests": first_and_steady(server, image, args.steady)}
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    publish("serving_warmup", result)


if __name__ == "__main__":
    main()
