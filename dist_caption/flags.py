"""Every absl flag of the project, defined here and validated here.

Each entry point calls the `define_*` groups it needs before `cli.run(main)`. Validators turn bad
values into one-line errors at parse time (see `cli.run`).
"""

from __future__ import annotations

import os

from absl import flags

from dist_caption import config, files
from serving import DEFAULT_MODEL_NAME

FLAGS = flags.FLAGS

DATASETS = ("synthetic", "coco", "karpathy", "flickr8k", "conceptual")
DEFAULT_DATA_ROOT = "data"


def _positive(name: str) -> None:
    flags.register_validator(name, lambda v: v is None or v > 0,
                             message=f"--{name} must be a positive number")


def _non_negative(name: str) -> None:
    flags.register_validator(name, lambda v: v is None or v >= 0,
                             message=f"--{name} must not be negative")


def _existing_path(name: str, what: str) -> None:
    def check(value):
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v and not files.exists(v):
                raise flags.ValidationError(f"--{name}: {what} {v} does not exist")
        return True

    flags.register_validator(name, check)


def _define_synthetic_params(seed_flag: str) -> None:
    flags.DEFINE_integer("num_images", 10_000, "Number of synthetic scenes to generate.")
    flags.DEFINE_integer(seed_flag, 0, "Seed of the synthetic scenes; the same seed gives the "
                         "same files.")
    flags.DEFINE_integer("image_size", 128, "Side of the square synthetic JPEGs, in pixels.")
    _positive("num_images")
    _non_negative(seed_flag)
    flags.register_validator("image_size", lambda v: v >= 32,
                             message="--image_size must be at least 32 pixels")


def define_synthetic_flags() -> None:
    """Flags of `python -m dist_caption.data.synthetic`."""
    flags.DEFINE_string("out_dir", os.path.join(DEFAULT_DATA_ROOT, "synthetic"),
                        "Folder to write the synthetic dataset into.")
    _define_synthetic_params("seed")


def define_dataset_flags() -> None:
    """Which dataset to read, and where its files are."""
    from dist_caption.data.conceptual import IMAGE_NAMES

    flags.DEFINE_enum("dataset", "synthetic", DATASETS, "The caption dataset to read.")
    flags.DEFINE_string("synthetic_dir", os.path.join(DEFAULT_DATA_ROOT, "synthetic"),
                        "synthetic: its folder; generated there (--num_images, --synthetic_seed, "
                        "--image_size) if absent.")
    _define_synthetic_params("synthetic_seed")
    flags.DEFINE_multi_string("captions_json", [],
                              "coco: captions_*.json files (repeat the flag); the split is read "
                              "from the file name, or given as split=path.")
    flags.DEFINE_string("karpathy_json", None, "karpathy: the split file, e.g. dataset_coco.json.")
    flags.DEFINE_string("flickr8k_captions", None,
                        "flickr8k: captions.txt (CSV) or Flickr8k.token.txt.")
    flags.DEFINE_string("flickr8k_splits_dir", None,
                        "flickr8k: folder of Flickr_8k.{train,dev,test}Images.txt "
                        "(default: beside the captions file).")
    flags.DEFINE_string("cc_train_tsv", None,
                        "conceptual: the training TSV (caption<TAB>URL), Train_GCC-training.tsv.")
    flags.DEFINE_string("cc_val_tsv", None,
                        "conceptual: the validation TSV, Validation_GCC-1.1.0-Validation.tsv "
                        "(halved into val and test).")
    flags.DEFINE_enum("cc_image_names", "url_sha1", list(IMAGE_NAMES),
                      "conceptual: how the downloaded images are named: url_sha1 "
                      "(<sha1 hex of the URL>.jpg, the TensorFlow tutorial's downloader) or row "
                      "(the line's 0-based row in its TSV, img2dataset; images of each TSV in "
                      "<image_dir>/train and <image_dir>/val).")
    flags.DEFINE_string("image_dir", None,
                        "coco, karpathy, flickr8k, conceptual: the images' root folder.")
    flags.DEFINE_integer("max_images", 0,
                         "Keep at most this many images per split (0: all): a fixed sample, the "
                         "images with the smallest sha256 of their id.")
    flags.DEFINE_integer("min_caption_words", 0,
                         "Drop captions with fewer words (after standardisation; 0: keep all).")
    _existing_path("captions_json", "captions file")
    _existing_path("karpathy_json", "split file")
    _existing_path("flickr8k_captions", "captions file")
    _existing_path("flickr8k_splits_dir", "folder")
    _existing_path("cc_train_tsv", "TSV file")
    _existing_path("cc_val_tsv", "TSV file")
    _existing_path("image_dir", "image folder")
    _non_negative("max_images")
    _non_negative("min_caption_words")
    needs = {"coco": ("captions_json", "image_dir"), "karpathy": ("karpathy_json", "image_dir"),
             "flickr8k": ("flickr8k_captions", "image_dir"),
             "conceptual": ("cc_train_tsv", "image_dir")}

    def check(values):
        for name in needs.get(values["dataset"], ()):
            if not values[name]:
                raise flags.ValidationError(f"--dataset={values['dataset']} needs --{name}")
        return True

    flags.register_multi_flags_validator(
        ["dataset", "captions_json", "karpathy_json", "flickr8k_captions", "cc_train_tsv",
         "image_dir"], check)


def define_extract_flags() -> None:
    """Flags of `python -m dist_caption.extract_features` (dataset flags included)."""
    from dist_caption.data.backbones import BACKBONES
    from dist_caption.data.cache import FEATURE_DTYPES

    define_dataset_flags()
    flags.DEFINE_enum("backbone", "patches", list(BACKBONES), "The frozen image backbone.")
    flags.DEFINE_string("weights", "imagenet",
                        "Backbone weights: imagenet, none (random), or a Keras weights file.")
    flags.DEFINE_string("cache_dir", None,
                        "Feature cache folder (default data/cache/<dataset>-<backbone>).")
    flags.DEFINE_integer("shard_size", 256, "Images per cache shard.")
    flags.DEFINE_integer("extract_batch_size", 32, "Images per backbone call.")
    flags.DEFINE_integer("vocab_size", 5000, "Vocabulary size, special tokens included.")
    flags.DEFINE_integer("min_count", 1, "A word enters the vocabulary if seen this often.")
    flags.DEFINE_enum("feature_dtype", "float16", list(FEATURE_DTYPES), "Stored feature dtype.")
    flags.DEFINE_bool("overwrite", False, "Rebuild a cache made with other settings.")
    flags.DEFINE_integer("task_index", None, "This process's index among --num_tasks "
                         "cooperating extraction processes (default: from TF_CONFIG, or "
                         "JOB_COMPLETION_INDEX with DIST_CAPTION_WORKERS, else 0 of 1).")
    flags.DEFINE_integer("num_tasks", None, "How many processes share the extraction (each "
                         "takes every N-th shard).")
    flags.DEFINE_float("extract_wait_timeout", 3600, "Seconds a task waits for task 0's "
                       "preparation, task 0 for the other tasks' shards, and they for the "
                       "manifest, before failing.")
    for name in ("shard_size", "extract_batch_size", "min_count", "num_tasks",
                 "extract_wait_timeout"):
        _positive(name)
    _non_negative("task_index")
    flags.register_validator("vocab_size", lambda v: v > 4,
                             message="--vocab_size must be above 4 (the special tokens)")
    flags.register_validator(
        "weights", lambda v: v in ("imagenet", "none") or os.path.isfile(v),
        message="--weights must be imagenet, none, or an existing weights file")


def default_cache_dir(dataset: str, backbone: str) -> str:
    return os.path.join(DEFAULT_DATA_ROOT, "cache", f"{dataset}-{backbone}")


def _define_settings(cls) -> None:
    """One flag per setting declared in `cls` (see `config.py`), with its validator."""
    for field in config.settings(cls):
        name, default, help_text = field.name, field.default, field.metadata["help"]
        if field.metadata["choices"]:
            flags.DEFINE_enum(name, default, list(field.metadata["choices"]), help_text)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_text)
        else:
            flags.DEFINE_string(name, default, help_text)
        check = field.metadata["check"]
        if check:
            flags.register_validator(name, check.test, message=f"--{name} {check.message}")


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


def _define_run_flags() -> None:
    """Which trained run (and checkpoint) to use, and the cache it was trained on."""
    flags.DEFINE_string("model_dir", config.DEFAULT_MODEL_DIR, "The training run.")
    flags.DEFINE_string("checkpoint", "best", "best, latest, or a checkpoint path.")
    flags.DEFINE_string("cache_dir", None, "Feature cache (default: the one trained on).")
    _existing_path("model_dir", "training run folder")
    _existing_path("cache_dir", "feature cache")


def define_evaluate_flags() -> None:
    """Flags of `python -m dist_caption.evaluate`."""
    _define_run_flags()
    flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to caption.")
    flags.DEFINE_integer("limit", 0, "Caption only the first N images (0: all).")
    flags.DEFINE_string("out", None, "JSON output (default <model_dir>/eval-<split>.json).")
    flags.DEFINE_integer("beam", 0, "Beam width (0: greedy decoding, as training evaluates).")
    flags.DEFINE_float("length_penalty", 0.0, "With --beam: rank the final beams by "
                       "log-probability / length**A (0: the summed log-probability).")
    _non_negative("limit")
    _non_negative("beam")
    _non_negative("length_penalty")


DEFAULT_EXPORT_BASE = os.path.join("exports", "caption")


def define_export_flags() -> None:
    """Flags of `python -m dist_caption.export`."""
    from dist_caption.data.images import MAX_BATCH, MAX_PIXELS

    _define_run_flags()
    flags.DEFINE_string("export_base", DEFAULT_EXPORT_BASE,
                        "Folder of numbered versions (the model_base_path TensorFlow Serving "
                        "watches); the export goes to <export_base>/<version>.")
    flags.DEFINE_integer("version", 0, "Version number to write (0: the next free integer).")
    flags.DEFINE_bool("export_xla", False, "Compile the greedy decoder with XLA (TensorFlow "
                      "Serving then needs --xla_cpu_compilation_enabled=true or "
                      "--xla_gpu_compilation_enabled=true).")
    flags.DEFINE_integer("max_image_pixels", MAX_PIXELS, "Images with more pixels (width x "
                         "height, read from the header before decoding) are refused.")
    flags.DEFINE_integer("max_batch", MAX_BATCH, "Most images per request.")
    flags.DEFINE_integer("max_beam", 16, "Widest beam the beam_search signature accepts.")
    flags.DEFINE_string("model_name", DEFAULT_MODEL_NAME, "Model name written in the warm-up "
                        "requests "
                        "(the name TensorFlow Serving serves the model under).")
    from dist_caption.export import DEFAULT_WARMUP_BATCH_SIZES

    flags.DEFINE_list("warmup_batch_sizes", [str(b) for b in DEFAULT_WARMUP_BATCH_SIZES],
                      "Batch sizes of the serving_default warm-up requests (also "
                      "caption_features with --export_xla), up to --max_batch: the server's "
                      "allowed_batch_sizes, so XLA compiles every shape before traffic.")
    for name in ("max_image_pixels", "max_batch", "max_beam"):
        _positive(name)
    _non_negative("version")
    flags.register_validator(
        "warmup_batch_sizes", lambda sizes: all(s.isdigit() and int(s) > 0 for s in sizes),
        message="--warmup_batch_sizes must be positive integers, e.g. 1,2,4,8,16,32,64")


def _define_saved_model_flag() -> None:
    flags.DEFINE_string("saved_model", DEFAULT_EXPORT_BASE,
                        "An export version folder, or a base folder (its newest version).")
    _existing_path("saved_model", "export folder")


def define_predict_flags() -> None:
    """Flags of `python -m dist_caption.predict IMAGE_OR_DIR...`."""
    _define_saved_model_flag()
    flags.DEFINE_integer("beam", 0, "Beam width (0: greedy with serving_default).")
    flags.DEFINE_string("attention_png", None, "Draw each word's attention map into this PNG.")
    _non_negative("beam")


def define_report_flags() -> None:
    """Flags of `python -m dist_caption.report`."""
    define_dataset_flags()
    _define_saved_model_flag()
    flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to caption.")
    flags.DEFINE_integer("limit", 0, "Only the first N images of the split (0: all).")
    flags.DEFINE_string("out", "report.html", "The HTML page to write.")
    _non_negative("limit")
