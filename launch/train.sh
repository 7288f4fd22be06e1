#!/usr/bin/env bash
# Local multi-worker training: launch/train.sh --workers N [--cpu] [launcher options] [training flags]
# The launcher's options: python -m dist_caption.launch --help. Exit status: see dist_caption/launch.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" -m dist_caption.launch "$@"
