#!/usr/bin/env bash
# Entrypoint of a training pod in a Kubernetes Indexed Job (k8s/training/): becomes this pod's
# worker, with TF_CONFIG built from JOB_COMPLETION_INDEX and DIST_CAPTION_* (see
# dist_caption/launch.py). Arguments are training flags.
#
#   DIST_CAPTION_CACHE_DIR    the feature cache (a shared volume or a gs:// / s3:// URL): every
#                             pod first runs its share of extract_features
#                             $DIST_CAPTION_DATA_FLAGS (task JOB_COMPLETION_INDEX of
#                             DIST_CAPTION_WORKERS: every N-th shard; pod 0 also writes the
#                             vocabulary first and the manifest last); each returns once the
#                             whole cache is there, waiting at most DIST_CAPTION_PREPARE_TIMEOUT s
#                             (default 3600) for the others
#   DIST_CAPTION_MODEL_DIR    the run folder (checkpoints; a volume every pod shares, or a URL)
#   DIST_CAPTION_EXPORT_BASE  if set, pod 0 exports the trained model there afterwards
#                             (where the serving Deployment reads models; may be a URL)
set -euo pipefail
index="$(python -m dist_caption.cluster index)"  # this pod's task (dist_caption/cluster.py)
if [ -n "${DIST_CAPTION_CACHE_DIR:-}" ]; then
  # shellcheck disable=SC2086  # the data flags are meant to split into words
  python -m dist_caption.extract_features --cache_dir "$DIST_CAPTION_CACHE_DIR" \
    --extract_wait_timeout "${DIST_CAPTION_PREPARE_TIMEOUT:-3600}" ${DIST_CAPTION_DATA_FLAGS:-}
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
