#!/usr/bin/env bash
# Entrypoint of a training pod in a Kubernetes Indexed Job (k8s/training/): becomes this pod's
# worker, with TF_CONFIG built from JOB_COMPLETION_INDEX and DIST_CAPTION_* (see
# dist_caption/launch.py). Arguments are training flags.
#
#   DIST_CAPTION_CACHE_DIR    the feature cache: pod 0 builds (or checks) it first with
#                             extract_features $DIST_CAPTION_DATA_FLAGS; the other pods wait
#                             (up to DIST_CAPTION_PREPARE_TIMEOUT s) for its manifest
#   DIST_CAPTION_MODEL_DIR    the run folder (checkpoints; on a volume every pod shares)
#   DIST_CAPTION_EXPORT_BASE  if set, pod 0 exports the trained model there afterwards
#                             (where the serving Deployment reads models)
set -euo pipefail
index="${JOB_COMPLETION_INDEX:-0}"
if [ -n "${DIST_CAPTION_CACHE_DIR:-}" ]; then
  if [ "$index" = 0 ]; then
    # shellcheck disable=SC2086  # the data flags are meant to split into words
    python -m dist_caption.extract_features --cache_dir "$DIST_CAPTION_CACHE_DIR" \
      ${DIST_CAPTION_DATA_FLAGS:-}
  else
    waited=0
    until [ -f "$DIST_CAPTION_CACHE_DIR/manifest.json" ]; do
      if [ "$waited" -ge "${DIST_CAPTION_PREPARE_TIMEOUT:-3600}" ]; then
        echo "error: no feature cache in $DIST_CAPTION_CACHE_DIR after ${waited}s: did pod 0 fail?" >&2
        exit 3
      fi
      sleep 5
      waited=$((waited + 5))
    done
  fi
  set -- --cache_dir "$DIST_CAPTION_CACHE_DIR" "$@"
fi
if [ -n "${DIST_CAPTION_MODEL_DIR:-}" ]; then
  set -- --model_dir "$DIST_CAPTION_MODEL_DIR" "$@"
fi
if [ "$index" != 0 ] || [ -z "${DIST_CAPTION_EXPORT_BASE:-}" ]; then
  exec python -m dist_caption.launch --pod "$@"  # the worker is the pod's main process
fi
# Pod 0 exports after training, so it stays the parent: pass a preemption on to the worker.
worker= term=
trap 'term=1; [ -z "$worker" ] || kill -TERM "$worker" 2>/dev/null' TERM INT
python -m dist_caption.launch --pod "$@" &
worker=$!
[ -z "$term" ] || kill -TERM "$worker"  # a signal that came before the worker had started
status=0
wait "$worker" || status=$?
while kill -0 "$worker" 2>/dev/null; do  # `wait` returned early for a trapped signal
  status=0
  wait "$worker" || status=$?
done
if [ "$status" -gt 128 ]; then  # cut short by the trap after the worker had exited:
  status=0                      # `wait` again gives the worker's own status (e.g. 42)
  wait "$worker" || status=$?
fi
[ "$status" = 0 ] || exit "$status"
exec python -m dist_caption.export --model_dir "$DIST_CAPTION_MODEL_DIR" \
  --export_base "$DIST_CAPTION_EXPORT_BASE"
