#!/usr/bin/env bash
# The main job end to end on the embedded default, from a fresh clone:
#   set up .venv/ -> generate the synthetic dataset -> extract its feature cache ->
#   train with 4 local worker processes (cross-entropy, then SCST) -> evaluate on the held-out
#   test split after each stage ->
#   export a SavedModel -> serve it with the local TF-Serving-compatible server ->
#   caption held-out test images with python -m serving.client -> stop the server.
# Idempotent: a second run reuses .venv/, the data, the cache, the finished run and its export.
# Extra arguments go to the cross-entropy stage's launch/train.sh (e.g. --epochs 3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
model_dir="${MODEL_DIR:-runs/quickstart}"
export_base="${EXPORT_BASE:-exports/quickstart}"
data_dir="data/synthetic"
py=.venv/bin/python
logs="$model_dir-logs"  # every line of every step; the console leaves out TensorFlow's
mkdir -p "$logs"        # start-up notices (listed in dist_caption/console.py)
quiet() { "$@" 2>&1 | $py -m dist_caption.log_filter "$logs/$3.log"; }  # quiet $py -m MODULE ...

# Stage 1, cross-entropy: a width-128 decoder, batches of 64 images x 4 captions (each image
# encoded once for its 4 captions), 6 rounds of 350 steps (2,100 steps: each of the 8,000
# training images seen 17 times), each followed by an evaluation on 200 validation images.
# XLA-compiled steps (--xla auto, float32 on CPU). Batches of 64 images make half the steps
# (and all-reductions) of batches of 32 for the same images: the stage takes ~1/5 less time
# here, to as good a model (docs/quality.md, "Towards 99%").
# Stage 2, self-critical training (SCST) from stage 1's best checkpoint: 2 rounds of 250 steps,
# 16 images x 5 sampled captions each, rewarded by their CIDEr-D. The best round of stage 2 by
# scene accuracy is exported. See docs/quality.md for what this reaches and why.
ce_dir="$model_dir-ce"
bash launch/train.sh --workers "${WORKERS:-4}" --model_dir "$ce_dir" --units 128 \
  --captions_per_image 4 --global_batch_size 256 --learning_rate 4e-3 --dropout 0 \
  --epochs 6 --steps_per_epoch 350 --eval_images 200 --early_stopping_metric scene_accuracy "$@"
quiet $py -m dist_caption.evaluate --model_dir "$ce_dir" --split test
bash launch/train.sh --workers "${WORKERS:-4}" --model_dir "$model_dir" --init_from "$ce_dir" \
  --objective scst --cache_dir data/cache/synthetic-patches --global_batch_size 16 \
  --learning_rate 1e-4 --warmup_steps 0 --min_lr_ratio 1 --epochs 2 --steps_per_epoch 250 \
  --eval_images 200 --early_stopping_metric scene_accuracy --patience 0
quiet $py -m dist_caption.evaluate --model_dir "$model_dir" --split test

# Export unless the newest version is newer than the best checkpoint.
newest="$(ls "$export_base" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1 || true)"
if [ -z "$newest" ] || [ "$model_dir/best/checkpoint" -nt "$export_base/$newest" ]; then
  quiet $py -m dist_caption.export --model_dir "$model_dir" --export_base "$export_base"
fi

ready="$(mktemp -u)"
$py -m serving.local_server --model_base_path "$export_base" --port 0 --rest_port 0 \
  --ready_file "$ready" > "$model_dir/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -f "$ready"' EXIT
port="$($py -m serving.local_server.wait "$ready" "$server")" \
  || { echo "error: see $model_dir/server.log" >&2; exit 1; }
mapfile -t images < <($py launch/served_vs_references.py test-images "$data_dir" 5)
$py -m serving.client --server "localhost:$port" --json "${images[@]}" \
  > "$model_dir/served.jsonl" 2> >($py -m dist_caption.log_filter "$logs/client.log" >&2)
echo "Captions served by the local server (localhost:$port) for held-out test images:"
$py launch/served_vs_references.py compare "$data_dir" "$model_dir/served.jsonl"
