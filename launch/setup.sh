#!/usr/bin/env bash
# Creates .venv/ (Python 3.11) and installs dist_caption with its test extra, and the `scan`
# extra (checkov) into its own .venv/checkov/.
#   bash launch/setup.sh [--gpu]
# --gpu adds the `gpu` extra (TensorFlow with its CUDA libraries); it is also added without
# the flag when `nvidia-smi -L` lists a GPU.
# Idempotent: a second run reuses .venv/ and reinstalls only when pyproject.toml or the
# extras changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras=test
for arg in "$@"; do
  case "$arg" in
    --gpu) extras=test,gpu ;;
    *) echo "error: unknown option $arg: the only option is --gpu" >&2; exit 2 ;;
  esac
done
if [ "$extras" = test ] && nvidia-smi -L 2>/dev/null | grep -q '^GPU [0-9]'; then
  extras=test,gpu
fi
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.dist_caption-installed
hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
want="$hash extras=$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  echo "$want" > "$stamp"
fi
if [ ! -x .venv/checkov/bin/checkov ] || [ "$(cat .venv/checkov/.installed 2>/dev/null)" != "$hash" ]; then
  "$py" -m venv .venv/checkov
  # shellcheck disable=SC2046  # one argument per requirement of the scan extra
  .venv/checkov/bin/python -m pip install --quiet $(.venv/bin/python -c '
import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["scan"]))')
  echo "$hash" > .venv/checkov/.installed
fi
