"""Caption local images with an export, and draw where each word looked.

    python -m dist_caption.predict photo.jpg more/ [--saved_model exports/caption/3] \\
        [--beam 3] [--attention_png attention.png]

`--saved_model` is a version folder or a base folder (its newest version is used; default
`exports/caption`). Folders are searched for .jpg/.jpeg/.png/.gif/.bmp files. `--attention_png`
draws one row per image and one panel per word: the decoder's cross-attention over the feature
grid (mean over heads, last layer) laid over the picture, as the TensorFlow tutorials do.
A thin command over `dist_caption.prediction`: its flags are checked before TensorFlow loads.
"""

from __future__ import annotations

from absl import flags

from dist_caption import cli
from dist_caption import flags as dc_flags
from dist_caption.errors import UserError

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if FLAGS.attention_png and FLAGS.beam:
        raise UserError("--attention_png draws greedy captions: leave out --beam")
    from dist_caption.files import writable_file
    from dist_caption.prediction import LoadedExport, draw_attention, find_images
    from serving.client import format_beams

    if FLAGS.attention_png:
        writable_file(FLAGS.attention_png, "attention_png")
    paths = find_images(argv[1:])
    captioner = LoadedExport(FLAGS.saved_model)
    results = captioner.caption(paths, beam=FLAGS.beam)
    for result in results:
        if FLAGS.beam:
            print(format_beams(result["path"], result["beams"]))
        else:
            print(f"{result['path']}: {result['caption']}  (log-prob {result['log_prob']:.2f})")
    if FLAGS.attention_png:
        words = [w.decode() for w in captioner.loaded.vocabulary.numpy()]
        rows, cols, _ = captioner.metadata["model"]["feature_shape"]
        draw_attention(results, (rows, cols), words, FLAGS.attention_png)
        print(f"wrote {FLAGS.attention_png}")


main.takes_positional = True


if __name__ == "__main__":
    dc_flags.define_predict_flags()
    cli.run(main)
