"""Every absl flag of the project, generated from the settings `config.py` declares.

Each entry point calls the `define_*` groups it needs before `cli.run(main)`. Validators turn bad
values into one-line errors at parse time (see `cli.run`). Nothing here imports TensorFlow or a
library module: a command checks its flags before it loads either.
"""

from __future__ import annotations

from absl import flags

from dist_caption import config

FLAGS = flags.FLAGS


def define_synthetic_flags() -> None:
    """Flags of `python -m dist_caption.make_synthetic`."""
    _define_settings(config.SyntheticSettings)


def define_dataset_flags() -> None:
    """Which dataset to read, and where its files are."""
    _define_settings(config.DatasetSettings)
    _define_rules(config.DATASET_RULES)


def define_extract_flags() -> None:
    """Flags of `python -m dist_caption.extract_features` (dataset flags included)."""
    define_dataset_flags()
    for cls in (config.ExtractionSettings, config.ExtractionRun, config.ExtractionTask):
        _define_settings(cls)


def _define_settings(cls) -> None:
    """One flag per setting declared in `cls` (see `config.py`), with its validator."""
    for field in config.settings(cls):
        name, help_text, kind = field.name, field.metadata["help"], field.metadata["kind"]
        default = config.default_of(field)
        if field.metadata["choices"]:
            flags.DEFINE_enum(name, default, list(field.metadata["choices"]), help_text)
        elif kind is bool:
            flags.DEFINE_bool(name, default, help_text)
        elif kind is int:
            flags.DEFINE_integer(name, default, help_text)
        elif kind is float:
            flags.DEFINE_float(name, default, help_text)
        elif kind == list[str]:
            flags.DEFINE_multi_string(name, default, help_text)
        elif kind is list:
            flags.DEFINE_list(name, default, help_text)
        else:
            flags.DEFINE_string(name, default, help_text)
        check = field.metadata["check"]
        if check:
            flags.register_validator(name, lambda v, check=check, name=name: v is None or _ok(
                check.error(name, v)))


def _ok(error: str | None) -> bool:
    if error:
        raise flags.ValidationError(error)
    return True


def _define_rules(rules: tuple[config.Rule, ...]) -> None:
    """A parse-time validator per cross-setting rule (see `config.Rule`)."""
    for rule in rules:
        flags.register_multi_flags_validator(
            list(rule.names), lambda v, rule=rule: rule.test(*(v[n] for n in rule.names)),
            message=" ".join(f"--{w}" if w in rule.names else w for w in rule.message.split()))


def define_model_flags() -> None:
    """The captioner's shape (saved with the run, so evaluation and export rebuild it)."""
    _define_settings(config.ModelSettings)
    _define_rules(config.MODEL_RULES)


def define_train_flags() -> None:
    """Flags of `python -m dist_caption.train`."""
    define_extract_flags()  # the cache to train on: --cache_dir, or the dataset's default
    define_model_flags()
    flags.DEFINE_string("model_dir", config.DEFAULT_MODEL_DIR,
                        "Checkpoints, TensorBoard logs and the run's config; reused to resume.")
    _define_settings(config.TrainSettings)
    _define_rules(config.TRAIN_RULES)


def define_evaluate_flags() -> None:
    """Flags of `python -m dist_caption.evaluate`."""
    _define_settings(config.RunSettings)
    _define_settings(config.EvaluateSettings)


def define_export_flags() -> None:
    """Flags of `python -m dist_caption.export`."""
    _define_settings(config.RunSettings)
    _define_settings(config.ExportSettings)


def define_predict_flags() -> None:
    """Flags of `python -m dist_caption.predict IMAGE_OR_DIR...`."""
    _define_settings(config.PredictSettings)


def define_report_flags() -> None:
    """Flags of `python -m dist_caption.report`."""
    define_dataset_flags()
    _define_settings(config.ReportSettings)
