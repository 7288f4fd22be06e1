#!/usr/bin/env bash
# Creates .venv/ (Python 3.11) and installs dist_caption with its test extra, and the `scan`
# extra (checkov) into its own .venv/checkov/.
# Idempotent: a second run reuses .venv/ and reinstalls only when pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.dist_caption-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi
if [ ! -x .venv/checkov/bin/checkov ] || [ "$(cat .venv/checkov/.installed 2>/dev/null)" != "$want" ]; then
  "$py" -m venv .venv/checkov
  # shellcheck disable=SC2046  # one argument per requirement of the scan extra
  .venv/checkov/bin/python -m pip install --quiet $(.venv/bin/python -c '
import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["scan"]))')
  echo "$want" > .venv/checkov/.installed
fi
