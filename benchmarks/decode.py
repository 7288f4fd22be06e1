"""Caption decoding speed: the exported KV-cached `serving_default` (with and without XLA)
against a same-size decoder that recomputes the whole prefix at every step (the tutorials' way).

    .venv/bin/python benchmarks/decode.py [--seconds 3]

Model: Transformer decoder, 2 layers, width 256, 2 heads, feed-forward 1024, vocabulary 1000, an
8x8x432 `patches` grid (the quickstart's model size), random weights with [END] made
unreachable so every caption is exactly 20 tokens long. All three paths take the same JPEG
bytes and run the same image decoding and backbone in the graph; only decoding differs:

- `cached`: the exported SavedModel's `serving_default`, reloaded with `tf.saved_model.load`;
- `cached_xla`: the same, exported with `--export_xla`;
- `recompute`: a `tf.function` running the full model on [START] + the prefix at every step.

Each is timed call by call for `--seconds` (at least 5 calls) per batch size, in one process.
Writes benchmarks/results/decode.json: {"batch": {"1": {"cached": {"captions_per_s",
"p50_ms", "p99_ms"}, ...}}, "speedup": ...}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from results_file import publish  # noqa: E402

from dist_caption import export  # noqa: E402
from dist_caption.data import backbones, text  # noqa: E402
from dist_caption.data.text import END_ID  # noqa: E402
from dist_caption.model import ModelConfig, build_captioner, recompute_greedy_decode  # noqa: E402

CAPTION_TOKENS = 20
CONFIG = ModelConfig("transformer", vocab_size=1000, feature_shape=(8, 8, 432),
                     max_len=CAPTION_TOKENS, num_layers=2, units=256, num_heads=2,
                     dropout=0.0)
BATCHES = (1, 8, 64)


def endless_model():
    """The benchmark model: random weights, [END] never chosen (fixed-length captions)."""
    tf.random.set_seed(0)
    model = build_captioner(CONFIG)
    bias = model.logits_layer.dense.bias
    bias.assign(tf.tensor_scatter_nd_update(bias, [[END_ID]], [-1e4]))
    return model


def timings(fn, images: tf.Tensor, seconds: float) -> dict:
    fn(images)  # trace / compile
    fn(images)
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 5:
        t = time.perf_counter()
        out = fn(images)
        np.asarray(out)
        latencies.append(time.perf_counter() - t)
    latencies = np.array(latencies)
    batch = int(images.shape[0])
    return {"captions_per_s": round(batch / latencies.mean(), 2),
            "p50_ms": round(1e3 * float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(1e3 * float(np.percentile(latencies, 99)), 2),
            "calls": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    model = endless_model()
    backbone = backbones.build_backbone("patches", "none")
    vocab = text.Vocabulary(list(text.SPECIALS) + [f"w{i}" for i in range(996)])
    paths = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, xla in (("cached", False), ("cached_xla", True)):
            module = export.build_module(model, backbone, vocab, image_size=96,
                                         max_pixels=10_000_000, max_batch=max(BATCHES),
                                         max_beam=4, xla=xla)
            paths[name] = os.path.join(tmp, name)
            export.save(module, paths[name])
        served = {name: tf.saved_model.load(path).signatures["serving_default"]
                  for name, path in paths.items()}
        recompute_module = export.build_module(model, backbone, vocab, image_size=96,
                                               max_pixels=10_000_000, max_batch=max(BATCHES),
                                               max_beam=4, xla=False)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def recompute(image_bytes):
            features = recompute_module.features(image_bytes)
            return recompute_greedy_decode(model, features, CONFIG.max_len)["tokens"]

        paths_fn = {"cached": lambda b: served["cached"](image_bytes=b)["tokens"],
                    "cached_xla": lambda b: served["cached_xla"](image_bytes=b)["tokens"],
                    "recompute": recompute}
        image = export.warmup_image()
        result = {"model": {"decoder": "transformer", "layers": 2, "units": 256, "heads": 2,
                            "vocab": 1000, "grid": "8x8x432", "caption_tokens": CAPTION_TOKENS},
                  "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__},
                  "batch": {}, "speedup": {}}
        for batch in BATCHES:
            images = tf.constant([image] * batch)
            row = {name: timings(fn, images, args.seconds) for name, fn in paths_fn.items()}
            lengths = {name: int(tf.reduce_sum(tf.cast(fn(images)[0] > 0, tf.int32)))
                       for name, fn in paths_fn.items()}
            assert set(lengths.values()) == {CAPTION_TOKENS}, lengths
            result["batch"][str(batch)] = row
            result["speedup"][str(batch)] = {
                name: round(row[name]["captions_per_s"] / row["recompute"]["captions_per_s"], 2)
                for name in ("cached", "cached_xla")}
            print(f"batch {batch}: " + ", ".join(
                f"{k} {v['captions_per_s']} captions/s" for k, v in row.items()), flush=True)
    publish("decode", result)


if __name__ == "__main__":
    main()
