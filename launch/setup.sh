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
# pip's own output (its warnings, setuptools' editable-install banner) goes to this log; the
# console shows one line per step, and the log's tail if a step fails.
log=.venv/setup.log
pip_install() {  # pip_install PYTHON WHAT ARGS...: one progress line, pip's output in $log
  local python="$1" what="$2"
  shift 2
  echo "setup: installing $what (pip's output: $log)"
  if ! "$python" -m pip install --quiet "$@" >> "$log" 2>&1; then
    echo "error: pip could not install $what; the end of $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
}
stamp=.venv/.dist_caption-installed
hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
want="$hash extras=$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip_install .venv/bin/python "an up-to-date pip" --upgrade pip
  pip_install .venv/bin/python "dist_caption[$extras] into .venv/" -e ".[$extras]"
  echo "$want" > "$stamp"
fi
if [ ! -x .venv/checkov/bin/checkov ] || [ "$(cat .venv/checkov/.installed 2>/dev/null)" != "$hash" ]; then
  "$py" -m venv .venv/checkov
  # shellcheck disable=SC2046  # one argument per requirement of the scan extra
  pip_install .venv/checkov/bin/python "the manifest scanner into .venv/checkov/" $(.venv/bin/python -c '
import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["scan"]))')
  echo "$hash" > .venv/checkov/.installed
fi
