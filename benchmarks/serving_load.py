"""Serving latency and throughput through the gRPC client against the local server.

    .venv/bin/python benchmarks/serving_load.py [--seconds 5]

The `bench_model.py` export (20-token captions) is served by `python -m serving.local_server`
with and without `--enable_batching` (max batch 64, 2 ms timeout, 2 batch threads). Clients send
one image per request with `serving.client.CaptionClient`, each in its own thread, at
concurrency 1, 8 and 32 for `--seconds` each. The reference is the signature's own batch-1
median latency, called in this process with the server idle. Writes
benchmarks/results/serving_load.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench_model import DESCRIPTION, endless_model, module  # noqa: E402
from results_file import publish  # noqa: E402

from dist_caption import exporting  # noqa: E402
from serving.client import CaptionClient  # noqa: E402
from serving.local_server import process  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCURRENCY = (1, 8, 32)


def start_server(base: str, batching: bool, tmp: str) -> tuple[subprocess.Popen, str]:
    ready = os.path.join(tmp, f"ready-{batching}.json")
    extra = (["--enable_batching", "--max_batch_size=64", "--batch_timeout_micros=2000",
              "--num_batch_threads=2"] if batching else [])
    proc, ports = process.start([f"--model_base_path={base}", "--port=0", "--threads=64",
                                 *extra], ready, timeout=600)
    return proc, f"localhost:{ports['port']}"


def load(server: str, image: bytes, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients sending one-image requests back to back for `seconds`."""
    latencies, errors, stop = [], [], threading.Event()

    def client() -> None:
        with CaptionClient(server, timeout=60) as c:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    c.caption([image])
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(repr(e))
                    continue
                latencies.append(time.perf_counter() - start)

    with CaptionClient(server, timeout=60) as warm:  # connect and trace before timing
        warm.caption([image])
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = 1e3 * np.array(latencies)
    return {"requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "requests": len(latencies), "errors": len(errors)}


def signature_median_ms(path: str, image: bytes, calls: int = 50) -> float:
    loaded = tf.saved_model.load(path)  # its methods take the decoding controls' defaults
    serve = loaded.serving_default
    images = tf.constant([image])
    serve(image_bytes=images)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        serve(image_bytes=images)["caption"].numpy()
        times.append(time.perf_counter() - start)
    return round(1e3 * float(np.median(times)), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    image = exporting.warmup_image()
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "caption")
        exporting.save(module(endless_model(), xla=False), os.path.join(base, "1"))
        result = {"model": DESCRIPTION, "machine": {"cpus": os.cpu_count()},
                  "signature_batch1_p50_ms": signature_median_ms(os.path.join(base, "1"), image),
                  "batching": {}, "no_batching": {}}
        for batching in (True, False):
            proc, server = start_server(base, batching, tmp)
            try:
                for concurrency in CONCURRENCY:
                    row = load(server, image, concurrency, args.seconds)
                    result["batching" if batching else "no_batching"][str(concurrency)] = row
                    print(f"batching={batching} concurrency {concurrency}: {row}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    reference = result["signature_batch1_p50_ms"]
    result["p99_over_signature_p50"] = {
        mode: {c: round(row["p99_ms"] / reference, 2) for c, row in result[mode].items()}
        for mode in ("batching", "no_batching")}
    publish("serving_load", result)


if __name__ == "__main__":
    main()
