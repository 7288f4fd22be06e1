#!/usr/bin/env bash
# Entrypoint of a training pod in a Kubernetes Indexed Job: becomes this pod's worker, with
# TF_CONFIG built from JOB_COMPLETION_INDEX and DIST_CAPTION_* (see dist_caption/launch.py).
set -euo pipefail
exec python -m dist_caption.launch --pod "$@"
