#!/usr/bin/env bash
# Verifies a GPU host: the driver and visible GPUs, a short training run on 1 GPU and on all of
# them (examples/s, scaling efficiency), the decoding benchmark with the XLA export on a GPU;
# writes benchmarks/results/gpu-<gpu name>.json and prints the README's tables of it.
# Without a GPU it says so in one line and exits 0. Options: benchmarks/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" benchmarks/gpu_check.py "$@"
