"""Export a trained run as a versioned SavedModel that captions image bytes in-graph.

    python -m dist_caption.export --model_dir runs/caption --export_base exports/caption

writes `exports/caption/<version>/` (the next integer unless `--version`), the layout TensorFlow
Serving watches; the signatures are described in `dist_caption.exporting`, which does the work.
A thin command: its flags are checked before TensorFlow loads.
"""

from __future__ import annotations

from absl import flags, logging

from dist_caption import cli
from dist_caption import flags as dc_flags

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from dist_caption.exporting import export

    logging.set_verbosity(logging.INFO)
    path = export(FLAGS.model_dir, FLAGS.export_base, checkpoint=FLAGS.checkpoint,
                  cache_dir=FLAGS.cache_dir, version=FLAGS.version or None,
                  xla=FLAGS.export_xla, max_pixels=FLAGS.max_image_pixels,
                  max_batch=FLAGS.max_batch, max_beam=FLAGS.max_beam,
                  model_name=FLAGS.model_name,
                  warmup_batch_sizes=tuple(int(b) for b in FLAGS.warmup_batch_sizes))
    print(f"exported {path}")


if __name__ == "__main__":
    dc_flags.define_export_flags()
    cli.run(main)
