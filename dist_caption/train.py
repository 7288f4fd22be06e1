"""Train a captioner over a feature cache.

    python -m dist_caption.train --cache_dir data/cache/synthetic-patches --model_dir runs/x
    launch/train.sh --workers 4 --model_dir runs/x          # 4 local worker processes

A thin command: its flags are checked before TensorFlow loads; the trainer is
`dist_caption.training`.
"""

from __future__ import annotations

import dataclasses

from absl import flags, logging

from dist_caption import cli, config
from dist_caption import flags as dc_flags
from dist_caption.config import TrainConfig
from dist_caption.errors import UserError
from serving import declaring

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from dist_caption import files, run_dir, training
    from dist_caption.files import writable_folder

    logging.set_verbosity(logging.INFO)
    cfg = declaring.from_flags(
        TrainConfig, FLAGS, model_dir=FLAGS.model_dir,
        cache_dir=FLAGS.cache_dir or config.default_cache_dir(FLAGS.dataset, FLAGS.backbone))
    if cfg.init_from and files.isdir(cfg.init_from):
        # The architecture comes from the run it starts from; flags given explicitly are
        # checked against it in `run`.
        init = run_dir.load(cfg.init_from)["model"]
        cfg = dataclasses.replace(cfg, **{
            f.name: init[f.name] for f in declaring.settings(config.ModelSettings)
            if not FLAGS[f.name].present and f.name in init})
    writable_folder(cfg.model_dir, "model_dir")
    if not files.isdir(cfg.cache_dir):
        raise UserError(f"no feature cache at {cfg.cache_dir}: build it with python -m "
                        f"dist_caption.extract_features (launch/train.sh does it for you)")
    training.run(cfg)


if __name__ == "__main__":
    dc_flags.define_train_flags()
    cli.run(main)
