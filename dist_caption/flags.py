"""Every absl flag of the training side's commands, generated from the settings `config.py`
declares (by `serving.declaring`).

Each entry point calls the `define_*` groups it needs before `cli.run(main)`. Validators turn bad
values into one-line errors at parse time (see `cli.run`). Nothing here imports TensorFlow or a
library module: a command checks its flags before it loads either.
"""

from __future__ import annotations

from dist_caption import config
from serving import declaring


def define_synthetic_flags() -> None:
    """Flags of `python -m dist_caption.make_synthetic`."""
    declaring.define_flags(config.SyntheticSettings)


def define_dataset_flags() -> None:
    """Which dataset to read, and where its files are."""
    declaring.define_flags(config.DatasetSettings)
    declaring.define_rules(config.DATASET_RULES)


def define_extract_flags() -> None:
    """Flags of `python -m dist_caption.extract_features` (dataset flags included)."""
    define_dataset_flags()
    for cls in (config.ExtractionSettings, config.ExtractionRun, config.ExtractionTask):
        declaring.define_flags(cls)


def define_model_flags() -> None:
    """The captioner's shape (saved with the run, so evaluation and export rebuild it)."""
    declaring.define_flags(config.ModelSettings)
    declaring.define_rules(config.MODEL_RULES)


def define_train_flags() -> None:
    """Flags of `python -m dist_caption.train`."""
    define_extract_flags()  # the cache to train on: --cache_dir, or the dataset's default
    define_model_flags()
    declaring.define_flags(config.TrainRun)
    declaring.define_flags(config.TrainSettings)
    declaring.define_rules(config.TRAIN_RULES)


def define_evaluate_flags() -> None:
    """Flags of `python -m dist_caption.evaluate`."""
    declaring.define_flags(config.RunSettings)
    declaring.define_flags(config.EvaluateSettings)


def define_export_flags() -> None:
    """Flags of `python -m dist_caption.export`."""
    declaring.define_flags(config.RunSettings)
    declaring.define_flags(config.ExportSettings)


def define_predict_flags() -> None:
    """Flags of `python -m dist_caption.predict IMAGE_OR_DIR...`."""
    declaring.define_flags(config.PredictSettings)


def define_report_flags() -> None:
    """Flags of `python -m dist_caption.report`."""
    define_dataset_flags()
    declaring.define_flags(config.ReportSettings)
