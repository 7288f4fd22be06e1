"""Every absl flag of the project, defined here and validated here.

Each entry point calls the `define_*` groups it needs before `cli.run(main)`. Validators turn bad
values into one-line errors at parse time (see `cli.run`).
"""

from __future__ import annotations

import os

from absl import flags

FLAGS = flags.FLAGS

DATASETS = ("synthetic", "coco", "karpathy", "flickr8k")
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
            if v and not os.path.exists(v):
                raise flags.ValidationError(f"--{name}: {what} {v} does not exist")
        return True

    flags.register_validator(name, check)


def _define_synthetic_params() -> None:
    flags.DEFINE_integer("num_images", 3000, "Number of synthetic scenes to generate.")
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same files.")
    flags.DEFINE_integer("image_size", 128, "Side of the square synthetic JPEGs, in pixels.")
    _positive("num_images")
    _non_negative("seed")
    flags.register_validator("image_size", lambda v: v >= 32,
                             message="--image_size must be at least 32 pixels")


def define_synthetic_flags() -> None:
    """Flags of `python -m dist_caption.data.synthetic`."""
    flags.DEFINE_string("out_dir", os.path.join(DEFAULT_DATA_ROOT, "synthetic"),
                        "Folder to write the synthetic dataset into.")
    _define_synthetic_params()


def define_dataset_flags() -> None:
    """Which dataset to read, and where its files are."""
    flags.DEFINE_enum("dataset", "synthetic", DATASETS, "The caption dataset to read.")
    flags.DEFINE_string("synthetic_dir", os.path.join(DEFAULT_DATA_ROOT, "synthetic"),
                        "synthetic: its folder; generated there (--num_images, --seed) if absent.")
    _define_synthetic_params()
    flags.DEFINE_multi_string("captions_json", [],
                              "coco: captions_*.json files (repeat the flag); the split is read "
                              "from the file name, or given as split=path.")
    flags.DEFINE_string("karpathy_json", None, "karpathy: the split file, e.g. dataset_coco.json.")
    flags.DEFINE_string("flickr8k_captions", None,
                        "flickr8k: captions.txt (CSV) or Flickr8k.token.txt.")
    flags.DEFINE_string("flickr8k_splits_dir", None,
                        "flickr8k: folder of Flickr_8k.{train,dev,test}Images.txt "
                        "(default: beside the captions file).")
    flags.DEFINE_string("image_dir", None, "coco, karpathy, flickr8k: the images' root folder.")
    _existing_path("captions_json", "captions file")
    _existing_path("karpathy_json", "split file")
    _existing_path("flickr8k_captions", "captions file")
    _existing_path("flickr8k_splits_dir", "folder")
    _existing_path("image_dir", "image folder")
    needs = {"coco": ("captions_json", "image_dir"), "karpathy": ("karpathy_json", "image_dir"),
             "flickr8k": ("flickr8k_captions", "image_dir")}

    def check(values):
        for name in needs.get(values["dataset"], ()):
            if not values[name]:
                raise flags.ValidationError(f"--dataset={values['dataset']} needs --{name}")
        return True

    flags.register_multi_flags_validator(
        ["dataset", "captions_json", "karpathy_json", "flickr8k_captions", "image_dir"], check)


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
    for name in ("shard_size", "extract_batch_size", "min_count"):
        _positive(name)
    flags.register_validator("vocab_size", lambda v: v > 4,
                             message="--vocab_size must be above 4 (the special tokens)")
    flags.register_validator(
        "weights", lambda v: v in ("imagenet", "none") or os.path.isfile(v),
        message="--weights must be imagenet, none, or an existing weights file")


def default_cache_dir(dataset: str, backbone: str) -> str:
    return os.path.join(DEFAULT_DATA_ROOT, "cache", f"{dataset}-{backbone}")
