#!/usr/bin/env bash
# Publish one export version where TensorFlow Serving reads it, never half of it:
#   launch/publish_model.sh EXPORT/VERSION DEST [--version N] [--skip_check]
#   launch/publish_model.sh exports/caption/3 /models/caption                # a local folder
#   launch/publish_model.sh exports/caption/3 gs://BUCKET/exports/caption    # an object store
#   launch/publish_model.sh exports/caption/3 /models/caption --kubectl      # the cluster volume
#     (first: kubectl apply -k k8s/serving/tools)
# The same as python -m serving.publish (see its docstring for how each destination is written).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py=python3
[ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m serving.publish "$@"
