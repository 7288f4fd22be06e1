"""A browsable HTML page of an export's captions on a dataset split, with their scores.

    python -m dist_caption.report --saved_model exports/caption --split test --out report.html

Each image (a thumbnail embedded in the page) is shown with the export's greedy caption, the
reference captions and its own BLEU-4, METEOR, ROUGE-L and CIDEr (and, on the synthetic dataset,
whether the caption names the scene exactly); click a column header to sort by it. The metric
table of the whole split heads the page. The dataset is named by the usual data flags
(`--dataset`, `--synthetic_dir`, ...), so the captions come from the image files themselves,
through the exported signature a server would run.
"""

from __future__ import annotations

from absl import flags, logging

from dist_caption import cli
from dist_caption import flags as dc_flags

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from dist_caption.data import sources
    from dist_caption.files import writable_file, write_atomic
    from dist_caption.metrics import format_metrics
    from dist_caption.reporting import build_report

    logging.set_verbosity(logging.INFO)
    writable_file(FLAGS.out, "out")  # before the work, not after it
    records, _ = sources.load_records(FLAGS, strict=False)  # reads images only
    if FLAGS.limit:
        records = [r for r in records if r.split == FLAGS.split][:FLAGS.limit]
    page, metrics = build_report(
        FLAGS.saved_model, records, FLAGS.split,
        FLAGS.synthetic_dir if FLAGS.dataset == "synthetic" else None)
    write_atomic(FLAGS.out, page)
    print(f"{FLAGS.split}: {format_metrics(metrics)}")
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    dc_flags.define_report_flags()
    cli.run(main)
