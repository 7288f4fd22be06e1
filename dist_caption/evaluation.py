"""Captioning a split of the feature cache with a model, and scoring it: what
`python -m dist_caption.evaluate` and the trainer's per-epoch evaluation share.

`caption_split` decodes (greedy, or a beam) every image of a split; `score` gives BLEU-1..4,
METEOR, ROUGE-L, CIDEr (pycocoevalcap) and, for the synthetic dataset, scene accuracy.
"""

from __future__ import annotations

import functools
import os

import tensorflow as tf

from dist_caption.data import pipeline, synthetic, text
from dist_caption.metrics import caption_metrics
from dist_caption.model.decoding import beam_search_decode, greedy_decode
from dist_caption.tracing import traced

@functools.lru_cache(maxsize=4)
def _decoder(model, max_len: int, beam: int = 0, length_penalty: float = 0.0,
             xla: bool = False, no_repeat_ngram: int = 0):
    """One traced decoder per model and setting, reused by every epoch's evaluation: greedy
    (`beam` 0; XLA-compiled with `xla`, as the `--export_xla` export's), else the best of
    `beam` beams; never repeating an n-gram of size `no_repeat_ngram` (0: off), as the
    served input of that name does."""
    controls = {"no_repeat_ngram": no_repeat_ngram} if no_repeat_ngram else None
    if not beam:
        return traced(lambda f: greedy_decode(model, f, max_len, controls)["tokens"],
                      reduce_retracing=True, jit_compile=xla)
    return traced(lambda f: beam_search_decode(model, f, max_len, beam, length_penalty,
                                               controls=controls)["tokens"][:, 0],
                  reduce_retracing=True)


def caption_split(model, cache_dir: str, split: str, max_len: int, limit: int | None = None,
                  batch_size: int = 64, zero_features: bool = False,
                  manifest: dict | None = None, beam: int = 0,
                  length_penalty: float = 0.0, xla: bool = False,
                  no_repeat_ngram: int = 0) -> tuple[dict, dict]:
    """Captions (greedy, or beam search with `beam` > 0; with n-gram blocking if
    `no_repeat_ngram`) and references for (the first `limit` images of) a split; greedy
    decoding XLA-compiled with `xla`."""
    manifest = manifest or pipeline.load_manifest(cache_dir)
    vocab = text.Vocabulary.load(os.path.join(cache_dir, manifest["vocab_file"]))
    decode = _decoder(model, max_len, beam, length_penalty, xla and not beam, no_repeat_ngram)
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
