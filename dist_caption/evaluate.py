"""Caption a split of the feature cache with a trained run and score it.

    python -m dist_caption.evaluate --model_dir runs/caption --split test

prints BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) and, for the synthetic dataset, scene
accuracy, and writes them with every caption to `<model_dir>/eval-<split>.json`.
"""

from __future__ import annotations

import functools
import json
import os

from absl import flags, logging

from dist_caption import cli
from dist_caption import flags as dc_flags
from dist_caption.errors import UserError

FLAGS = flags.FLAGS
RUN_FILE = "run.json"


def load_run(model_dir: str) -> dict:
    """The run description `train` writes: model config, cache, vocabulary."""
    from dist_caption.data.cache import read_json

    path = os.path.join(model_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{model_dir} is not a training run ({RUN_FILE} missing): pass the "
                        f"--model_dir that python -m dist_caption.train wrote")
    return read_json(path)


def config_of_run(run: dict):
    from dist_caption.model.captioner import ModelConfig

    values = dict(run["model"])
    values["feature_shape"] = tuple(values["feature_shape"])
    return ModelConfig(**values)


def build_captioner_for_run(model_dir: str):
    """The run's captioner, freshly initialised (the same build path as training)."""
    from dist_caption.model.captioner import build_captioner

    return build_captioner(config_of_run(load_run(model_dir)))


def restore_model(model_dir: str, checkpoint: str = "best"):
    """The run's captioner (built by the one build function) with `checkpoint` restored.

    `checkpoint` is 'best', 'latest' or a checkpoint path prefix.
    """
    import tensorflow as tf

    run = load_run(model_dir)
    model = build_captioner_for_run(model_dir)
    if checkpoint in ("best", "latest"):
        folder = os.path.join(model_dir, "best" if checkpoint == "best" else "checkpoints")
        path = tf.train.latest_checkpoint(folder)
        if path is None and checkpoint == "best":
            path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
        if path is None:
            raise UserError(f"no checkpoint in {model_dir}: train first, or pass --checkpoint")
    else:
        path = checkpoint
    # The checkpoint also holds the optimizer and loop state: only the model is wanted, and
    # every one of its weights must be there.
    tf.train.Checkpoint(model=model).restore(path).expect_partial() \
        .assert_existing_objects_matched()
    logging.info("restored %s", path)
    return model, run


@functools.lru_cache(maxsize=4)
def _greedy_tokens(model, max_len: int):
    """One traced greedy decoder per model, reused by every epoch's evaluation."""
    import tensorflow as tf

    from dist_caption.model.decoding import greedy_decode

    return tf.function(lambda f: greedy_decode(model, f, max_len)["tokens"],
                       reduce_retracing=True)


def caption_split(model, cache_dir: str, split: str, max_len: int, limit: int | None = None,
                  batch_size: int = 64, zero_features: bool = False,
                  manifest: dict | None = None) -> tuple[dict, dict]:
    """Greedy captions and references for (the first `limit` images of) a split."""
    import tensorflow as tf

    from dist_caption.data import pipeline, text

    manifest = manifest or pipeline.load_manifest(cache_dir)
    vocab = text.Vocabulary.load(os.path.join(cache_dir, manifest["vocab_file"]))
    decode = _greedy_tokens(model, max_len)
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
    from dist_caption.metrics import caption_metrics

    metrics = caption_metrics(predictions, references)
    synthetic_dir = manifest.get("source", {}).get("synthetic_dir")
    if manifest.get("dataset") == "synthetic" and synthetic_dir:
        from dist_caption.data import synthetic

        metrics["scene_accuracy"] = synthetic.scene_accuracy(
            predictions, synthetic.load_scenes(synthetic_dir))
    return metrics


def main(argv: list[str]) -> None:
    del argv
    from dist_caption.data import pipeline
    from dist_caption.metrics import format_metrics

    logging.set_verbosity(logging.INFO)
    model, run = restore_model(FLAGS.model_dir, FLAGS.checkpoint)
    cache_dir = FLAGS.cache_dir or run["cache_dir"]
    manifest = pipeline.load_manifest(cache_dir)
    pipeline.check_compatible(manifest, {"feature_shape": run["model"]["feature_shape"],
                                         "vocab_sha256": run["vocab_sha256"]}, cache_dir)
    predictions, references = caption_split(
        model, cache_dir, FLAGS.split, run["model"]["max_len"],
        limit=FLAGS.limit or None, zero_features=run.get("zero_features", False),
        manifest=manifest)
    metrics = score(predictions, references, manifest)
    out = FLAGS.out or os.path.join(FLAGS.model_dir, f"eval-{FLAGS.split}.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"split": FLAGS.split, "images": len(predictions), "metrics": metrics,
                   "captions": {k: {"prediction": v, "references": references[k]}
                                for k, v in predictions.items()}}, f, indent=1)
    print(f"{FLAGS.split} ({len(predictions)} images): {format_metrics(metrics)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    dc_flags.define_evaluate_flags()
    cli.run(main)
