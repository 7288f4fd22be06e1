"""Caption a split of the feature cache with a trained run and score it.

    python -m dist_caption.evaluate --model_dir runs/caption --split test
    python -m dist_caption.evaluate --model_dir runs/caption --beam 3 --length_penalty 0.5

prints BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) and, for the synthetic dataset, scene
accuracy, and writes them with every caption to `<model_dir>/eval-<split>.json`.

A thin command: its flags are checked before TensorFlow loads; the work is
`dist_caption.evaluation`'s.
"""

from __future__ import annotations

from absl import flags, logging

from dist_caption import cli
from dist_caption import flags as dc_flags

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from dist_caption import run_dir
    from dist_caption.data import pipeline
    from dist_caption.evaluation import caption_split, score
    from dist_caption import files
    from dist_caption.files import writable_file, write_json_atomic
    from dist_caption.metrics import format_metrics

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
        manifest=manifest, beam=FLAGS.beam, length_penalty=FLAGS.length_penalty,
        no_repeat_ngram=FLAGS.no_repeat_ngram)
    metrics = score(predictions, references, manifest)
    write_json_atomic(out, {"split": FLAGS.split, "images": len(predictions),
                            "checkpoint": files.absolute(
                                run_dir.checkpoint_path(FLAGS.model_dir, FLAGS.checkpoint)),
                            "decoding": {"beam": FLAGS.beam,
                                         "length_penalty": FLAGS.length_penalty,
                                         "no_repeat_ngram": FLAGS.no_repeat_ngram},
                            "metrics": metrics,
                            "captions": {k: {"prediction": v, "references": references[k]}
                                         for k, v in predictions.items()}})
    print(f"{FLAGS.split} ({len(predictions)} images): {format_metrics(metrics)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    dc_flags.define_evaluate_flags()
    cli.run(main)
