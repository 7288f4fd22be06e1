"""Generates the embedded synthetic dataset (coloured-shape scenes and their captions).

    python -m dist_caption.make_synthetic --out_dir data/synthetic [--num_images 10000]
        [--seed 0] [--image_size 64]
    (python -m dist_caption.data.synthetic, its older name, runs this command)

Extraction generates it by itself when `--synthetic_dir` holds none; this command is for
making one on its own.
"""

from __future__ import annotations

from absl import flags

from dist_caption import cli
from dist_caption.flags import define_synthetic_flags

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    """Generates the dataset the flags describe."""
    del argv  # cli.run rejects positional arguments
    from dist_caption.data import synthetic
    from dist_caption.files import writable_folder

    writable_folder(FLAGS.out_dir, "out_dir")
    synthetic.generate(FLAGS.out_dir, FLAGS.num_images, FLAGS.seed, FLAGS.image_size)


def run() -> None:
    define_synthetic_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
