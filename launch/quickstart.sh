#!/usr/bin/env bash
# The main job end to end on the embedded default, from a fresh clone:
#   set up .venv/ -> generate the synthetic dataset -> extract its feature cache ->
#   train with 4 local worker processes -> evaluate on the held-out test split.
# Idempotent: a second run reuses .venv/, the data, the cache and the finished run.
# Extra arguments go to launch/train.sh (e.g. --epochs 3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
model_dir="${MODEL_DIR:-runs/quickstart}"
bash launch/train.sh --workers "${WORKERS:-4}" --model_dir "$model_dir" "$@"
.venv/bin/python -m dist_caption.evaluate --model_dir "$model_dir" --split test
