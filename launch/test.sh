#!/usr/bin/env bash
# Sets up .venv/ (idempotent) and runs the whole test suite. This is what CI runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
exec .venv/bin/python -m pytest -q "$@"
