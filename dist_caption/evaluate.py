"""Caption a split of the feature cache with a trained run and score it.

    python -m dist_caption.evaluate --model_dir runs/caption --split test
    python -m dist_caption.evaluate --model_dir runs/caption --beam 3 --length_penalty 0.5

prints BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) and, for the synthetic dataset, scene
accuracy, and writes them with every caption to `<model_dir>/eval-<split>.json`.
"""

from __future__ import annotations

import functools
import os

import tensorflow as tf
from absl import flags, logging

from dist_caption import cli, run_dir
from dist_caption import flags as dc_flags
from dist_caption.data import pipeline, synthetic, text
from dist_caption.files import writable_file, write_json_atomic
from dist_caption.metrics import caption_metrics, format_metrics
from dist_caption.model.decoding import beam_search_decode, greedy_decode

FLAGS = flags.FLAGS


@functools.lru_cache(maxsize=4)
def _decoder(model, max_len: int, beam: int = 0, length_penalty: float = 0.0,
             xla: bool = False):
    """One traced decoder per model and setting, reused by every epoch's evaluation: greedy
    (`beam` 0; XLA-compiled with `xla`, as the `--export_xla` export's), else the best of
    `beam` beams."""
    if not beam:
        return tf.function(lambda f: greedy_decode(model, f, max_len)["tokens"],
                           reduce_retracing=True, jit_compile=xla)
    return tf.function(lambda f: beam_search_decode(model, f, max_len, beam,
                                                    length_penalty)["tokens"][:, 0],
                       reduce_retracing=True)


def caption_split(model, cache_dir: str, split: str, max_len: int, limit: int | None = None,
                  batch_size: int = 64, zero_features: bool = False,
                  manifest: dict | None = None, beam: int = 0,
                  length_penalty: float = 0.0, xla: bool = False) -> tuple[dict, dict]:
    """Captions (greedy, or beam search with `beam` > 0) and references for (the first
    `limit` images of) a split; greedy decoding XLA-compiled with `xla`."""
    manifest = manifest or pipeline.load_manifest(cache_dir)
    vocab = text.Vocabulary.load(os.path.join(cache_dir, manifest["vocab_file"]))
    decode = _decoder(model, max_len, beam, length_penalty, xla and not beam)
    predictions, references = {}, {}
    for batch in pipeline.image_dataset(cache_dir, split, batch_size, limit=limit,
                                        manifest=manifest):
        features = batch["features"]
        if zero_features:
            features = tf.zeros_like(features)
        tokens = decode(features).numpy()
        for image_id, row, refs in zip(batch["image_id"].numpy(), tokens,
                                       batch["captions"].numpy()):
            image_id = image_id.decode()
            predictions[image_id] = vocab.decode(row)
            references[image_id] = [r.decode() for r in refs if r]
    return predictions, references


def score(predictions: dict, references: dict, manifest: dict) -> dict:
    """COCO caption metrics, plus scene accuracy when the cache is the synthetic dataset."""
    metrics = caption_metrics(predictions, references)
    synthetic_dir = manifest.get("source", {}).get("synthetic_dir")
    if manifest.get("dataset") == "synthetic" and synthetic_dir:
        metrics["scene_accuracy"] = synthetic.scene_accuracy(
            predictions, synthetic.load_scenes(synthetic_dir))
    return metrics


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    out = writable_file(FLAGS.out or run_dir.eval_file(FLAGS.model_dir, FLAGS.split), "out")
    model, run = run_dir.restore(FLAGS.model_dir, FLAGS.checkpoint)
    cache_dir = FLAGS.cache_dir or run["cache_dir"]
    manifest = pipeline.load_manifest(cache_dir)
    pipeline.check_compatible(manifest, {"feature_shape": run["model"]["feature_shape"],
                                         "vocab_sha256": run["vocab_sha256"]}, cache_dir)
    predictions, references = caption_split(
        model, cache_dir, FLAGS.split, run["model"]["max_len"],
        limit=FLAGS.limit or None, zero_features=run.get("zero_features", False),
        manifest=manifest, beam=FLAGS.beam, length_penalty=FLAGS.length_penalty)
    metrics = score(predictions, references, manifest)
    write_json_atomic(out, {"split": FLAGS.split, "images": len(predictions),
                            "decoding": {"beam": FLAGS.beam,
                                         "length_penalty": FLAGS.length_penalty},
                            "metrics": metrics,
                            "captions": {k: {"prediction": v, "references": references[k]}
                                         for k, v in predictions.items()}})
    print(f"{FLAGS.split} ({len(predictions)} images): {format_metrics(metrics)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    dc_flags.define_evaluate_flags()
    cli.run(main)
