"""Every setting of the training side's commands, declared once: name, type, default, help and
check (with `serving.declaring`; serving/config.py declares the serving commands').

The absl flags (`flags.py`), the model's config (`ModelConfig`), the trainer's (`TrainConfig`),
the data preparation's (`DatasetSettings`, `ExtractionSettings`, `ExtractionRun`) and the
export's (`ExportSettings`) are all built from these declarations, and the launcher derives
from them which flags go to data preparation. Nothing here imports TensorFlow: a command
checks its flags before it loads any.

    >>> config = ModelConfig(decoder="transformer", vocab_size=20, feature_shape=(2, 3, 4),
    ...                      max_len=6, stem="linear")
    >>> config.validate()
    >>> config.feed_forward_units
    1024
    >>> ModelConfig(vocab_size=20, feature_shape=(2, 3, 4), units=10, num_heads=3).validate()
    Traceback (most recent call last):
    ...
    ValueError: num_heads must divide units (got units=10, num_heads=3)
"""

from __future__ import annotations

import dataclasses
import os

from serving import DEFAULT_MODEL_NAME
from serving.declaring import (AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, Check,
                               ExistingPath, Rule, check, declare, from_args, setting, settings)

DECODERS = ("transformer", "gru_attention")
# How the grid's cells become vectors: `linear` projects each cell (any backbone); `conv` runs a
# small CNN over the image the cells' raw pixel patches make up (the `patches` backbone only).
STEMS = ("linear", "conv")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
OBJECTIVES = ("cross_entropy", "scst")
SCST_BASELINES = ("mean", "greedy")
METRICS = ("CIDEr", "BLEU-4", "BLEU-1", "METEOR", "ROUGE-L", "scene_accuracy", "val_loss")
DEFAULT_MODEL_DIR = os.path.join("runs", "caption")
SPLITS = ("train", "val", "test")
DATASETS = ("synthetic", "coco", "karpathy", "flickr8k", "conceptual")
# The backbones' names; what each is lives in `data/backbones.py` (which checks it has these).
BACKBONES = ("patches", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
             "inception_v3", "resnet50", "vit", "clip", "siglip")
CLASS_TOKEN = ("drop", "keep")  # what becomes of a ViT or CLIP encoder's class token
FEATURE_DTYPES = ("float16", "float32")
CC_IMAGE_NAMES = ("url_sha1", "row")  # how Conceptual Captions images are named on disk
DEFAULT_DATA_ROOT = "data"
DEFAULT_EXPORT_BASE = os.path.join("exports", "caption")
MAX_PIXELS = 40_000_000  # default limit per image: a 40-megapixel photo, ~120 MB decoded
MAX_BATCH = 64  # default limit of images per request
MAX_BEAM = 16  # default widest beam of the beam_search signature
WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # the warm-up requests' batch sizes
# The vocabulary's special tokens (data/text.py spells them), and the ones the decoder must
# never produce (their logits are banned).
PAD_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3
BANNED_IDS = (PAD_ID, UNK_ID, START_ID)


def _declare(name: str, doc: str, fields: dict, **options):
    """A settings dataclass of this module (see `serving.declaring.declare`)."""
    return declare(name, doc, fields, module=__name__, **options)


# ------------------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The captioner's shape, as the user sets it (saved with the run)."""
    decoder: str = setting("transformer", "Decoder family.", choices=DECODERS)
    num_layers: int = setting(2, "Decoder layers (transformer).", check=POSITIVE)
    units: int = setting(256, "Model width.", check=POSITIVE)
    num_heads: int = setting(2, "Attention heads (must divide --units).", check=POSITIVE)
    ff_units: int = setting(0, "Feed-forward width (0: 4 x --units).", check=NON_NEGATIVE)
    dropout: float = setting(0.1, "Dropout rate.", check=FRACTION)
    encoder_layers: int = setting(0, "Transformer encoder layers over the feature grid.",
                                  check=NON_NEGATIVE)
    stem: str = setting("auto", "How grid cells become vectors: linear (a dense projection, any "
                        "backbone) or conv (a small trainable CNN over the image that the raw "
                        "pixel patches of the `patches` backbone make up); auto: conv on "
                        "`patches`, else linear.", choices=("auto", *STEMS))
    stem_channels: int = setting(64, "Output channels of --stem conv (a multiple of 4).",
                                 check=Check(lambda v: v >= 4 and v % 4 == 0,
                                             "must be a positive multiple of 4"))
    max_len: int = setting(24, "Caption length in tokens, [START] and [END] included.",
                           check=Check(lambda v: v >= 3, "must be at least 3"))


MODEL_RULES = (Rule(("units", "num_heads"), lambda u, h: u % h == 0,
                    "num_heads must divide units"),)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(ModelSettings):
    """A captioner's full config: the settings plus what the feature cache fixes.

    `gru_attention` is one GRU cell with additive attention: `num_layers`, `num_heads`,
    `ff_units` and `encoder_layers` only apply to `transformer`. `stem` is resolved here
    (`linear` or `conv`, see `STEMS`).
    """
    vocab_size: int
    feature_shape: tuple[int, int, int]
    stem: str = "linear"

    @property
    def feed_forward_units(self) -> int:
        return self.ff_units or 4 * self.units

    @property
    def pixel_patch(self) -> int | None:
        """The side p of a cell read as a p x p x 3 pixel patch; None if it cannot be one."""
        side = round((self.feature_shape[2] / 3) ** 0.5)
        return side if 3 * side * side == self.feature_shape[2] else None

    def validate(self) -> None:
        """Raises ValueError naming the first bad field and what it should be."""
        specials = max(*BANNED_IDS, END_ID) + 1
        if self.vocab_size <= specials:
            raise ValueError(f"vocab_size must be more than the {specials} special tokens, "
                             f"got {self.vocab_size}")
        if len(self.feature_shape) != 3 or min(self.feature_shape) < 1:
            raise ValueError("feature_shape must be three positive sizes (H, W, C), "
                             f"got {self.feature_shape}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        check(self, MODEL_RULES)
        if self.stem == "conv" and (self.pixel_patch is None or self.pixel_patch % 4):
            raise ValueError("stem 'conv' needs a grid of raw RGB pixel patches whose side is a "
                             "multiple of 4 (the `patches` backbone), got cells of "
                             f"{self.feature_shape[2]} values")

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """A config saved by `dataclasses.asdict` (run.json), JSON lists back to tuples."""
        return cls(**{**values, "feature_shape": tuple(values["feature_shape"]),
                      "ff_units": values.get("ff_units") or 0})


# ---------------------------------------------------------------------------------- training

@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """How to train, as the user sets it."""
    global_batch_size: int = setting(64, "Captions per step, over all replicas (with --objective "
                                     "scst: images, each sampled --scst_samples times).",
                                     check=POSITIVE)
    captions_per_image: int = setting(
        0, "Group each batch by image: B/k images with k of their captions each, every image "
        "encoded once for its k captions (0: one row per caption, images repeated).",
        check=NON_NEGATIVE)
    epochs: int = setting(10, "Epochs to train.", check=POSITIVE)
    steps_per_epoch: int = setting(0, "Steps per epoch (0: training captions / batch).",
                                   check=NON_NEGATIVE)
    learning_rate: float = setting(1e-3, "Peak learning rate (after warm-up).", check=POSITIVE)
    warmup_steps: int = setting(200, "Linear warm-up steps.", check=NON_NEGATIVE)
    min_lr_ratio: float = setting(0.05, "Cosine decay ends at this fraction of the peak.",
                                  check=Check(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    weight_decay: float = setting(0.01, "AdamW weight decay.", check=NON_NEGATIVE)
    clip_norm: float = setting(1.0, "Clip the global norm of the summed gradient (0: off).",
                               check=NON_NEGATIVE)
    label_smoothing: float = setting(0.0, "Label smoothing of the token loss.", check=FRACTION)
    ema_decay: float = setting(0.0, "Keep an exponential moving average of the trainable "
                               "weights, average = d * average + (1 - d) * weights after every "
                               "applied step, d = min(decay, (1 + n) / (10 + n)) after n steps "
                               "(0: off); validation, the best checkpoint, "
                               "evaluate, export and --init_from then use the average.",
                               check=FRACTION)
    strategy: str = setting("auto", "auto: multi_worker if TF_CONFIG has >1 task (NCCL on GPUs, "
                            "ring on CPUs), mirrored if >1 GPU, else default.",
                            choices=STRATEGIES)
    cpu_devices: int = setting(0, "Split the CPU into this many logical devices (to try "
                               "MirroredStrategy without GPUs); 0 leaves it whole.",
                               check=NON_NEGATIVE)
    precision: str = setting("auto", "auto: mixed_float16 on GPU, float32 on CPU.",
                             choices=PRECISIONS)
    xla: str = setting("auto", "Compile the per-replica forward/backward pass and the "
                       "evaluation's decoding with XLA (auto: on with GPUs, and on CPU for "
                       "float32 unless --cpu_devices > 1).", choices=("auto", "true", "false"))
    seed: int = setting(0, "Seed of the weights and the data order.")
    shuffle: bool = setting(True, "Shuffle the training data (off: a fixed order, for "
                            "reproducibility checks).")
    eval_images: int = setting(300, "Validation images captioned for metrics each epoch (0: "
                               "skip caption metrics).", check=NON_NEGATIVE)
    early_stopping_metric: str = setting("CIDEr", "Metric for early stopping and the best "
                                         "checkpoint.", choices=METRICS)
    patience: int = setting(3, "Epochs without improvement before stopping (0: off).",
                            check=NON_NEGATIVE)
    checkpoint_every: int = setting(0, "Also checkpoint every N steps (0: per epoch).",
                                    check=NON_NEGATIVE)
    keep_checkpoints: int = setting(3, "Checkpoints kept (the best is kept apart).",
                                    check=POSITIVE)
    log_every: int = setting(50, "Log and write summaries every N steps.", check=POSITIVE)
    heartbeat_timeout: float = setting(
        30.0, "Multi-worker: seconds without a worker's heartbeat (dead, stalled, cut off) "
        "before the coordination service fails every collective; the others then exit 43.",
        check=POSITIVE)
    collective_timeout: float = setting(
        0.0, "Multi-worker: seconds one collective may take before it fails (0: no limit; the "
        "heartbeat notices dead peers; a limit must exceed the chief's per-epoch evaluation, "
        "which the others wait for in a collective).", check=NON_NEGATIVE)
    zero_features: bool = setting(False, "Train image-blind (features zeroed): the baseline a "
                                  "captioner must beat.")
    objective: str = setting(
        "cross_entropy", "cross_entropy (teacher forcing), or scst: self-critical sequence "
        "training, the policy gradient of each sampled caption's CIDEr-D (needs --init_from).",
        choices=OBJECTIVES)
    init_from: str = setting("", "Start from this run's best checkpoint: its weights only (a "
                             "new optimizer and run folder), its architecture and vocabulary.")
    scst_samples: int = setting(5, "scst: captions sampled per image each step (a step samples "
                                "--global_batch_size x --scst_samples captions).",
                                check=POSITIVE)
    scst_baseline: str = setting("mean", "scst: the reward subtracted from a sample's: the mean "
                                 "of the image's other samples, or its greedy caption's.",
                                 choices=SCST_BASELINES)
    scst_end_token: bool = setting(True, "scst: include the [END] token's log-probability in "
                                   "the policy gradient (what teaches the model when to stop).")
    max_steps: int = setting(0, "Stop after this many steps in total (0: all epochs).",
                             flag=False)
    initial_loss_scale: float = setting(2.0 ** 15, "float16's first loss scale.", flag=False)


TRAIN_RULES = (
    Rule(("objective", "init_from"), lambda objective, init: objective != "scst" or bool(init),
         "--objective scst starts from a trained model: pass --init_from RUN_DIR (a "
         "cross-entropy run)"),
    Rule(("objective", "scst_baseline", "scst_samples"),
         lambda objective, baseline, k: objective != "scst" or baseline != "mean" or k >= 2,
         "--scst_baseline mean needs --scst_samples of at least 2 (or use --scst_baseline "
         "greedy)"),
)


TrainRun = _declare("TrainRun", "Where `python -m dist_caption.train` keeps its run.", {
    "model_dir": setting(DEFAULT_MODEL_DIR, "Checkpoints, TensorBoard logs and the run's "
                         "config; reused to resume."),
}, kw_only=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(ModelSettings, TrainSettings):
    """Everything a training run needs; `train.main` fills it from the flags, tests directly."""
    cache_dir: str
    model_dir: str

    def model_config(self, manifest: dict) -> ModelConfig:
        """The captioner for the cache described by `manifest` (vocabulary, grid, backbone)."""
        stem = self.stem if self.stem != "auto" else (
            "conv" if manifest["backbone"] == "patches" else "linear")
        shape = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSettings)}
        return ModelConfig(**{**shape, "stem": stem}, vocab_size=manifest["vocab_size_actual"],
                           feature_shape=tuple(manifest["feature_shape"]))


# ------------------------------------------------------------------------- data preparation

def _synthetic_params(seed: str):
    """The synthetic scenes' parameters, under the seed name of the command that has them."""
    return {
        "num_images": setting(10_000, "Number of synthetic scenes to generate.", check=POSITIVE),
        seed: setting(0, "Seed of the synthetic scenes; the same seed gives the same files.",
                      check=NON_NEGATIVE),
        "image_size": setting(128, "Side of the square synthetic JPEGs, in pixels.",
                              check=Check(lambda v: v >= 32, "must be at least 32 pixels")),
    }


SyntheticSettings = _declare("SyntheticSettings", "`python -m dist_caption.make_synthetic`.", {
    "out_dir": setting(os.path.join(DEFAULT_DATA_ROOT, "synthetic"),
                       "Folder to write the synthetic dataset into."),
    **_synthetic_params("seed")}, kw_only=True)

DatasetSettings = _declare("DatasetSettings", "Which dataset to read, and where its files are.", {
    "dataset": setting("synthetic", "The caption dataset to read.", choices=DATASETS),
    "synthetic_dir": setting(os.path.join(DEFAULT_DATA_ROOT, "synthetic"),
                             "synthetic: its folder; generated there (--num_images, "
                             "--synthetic_seed, --image_size) if absent."),
    **_synthetic_params("synthetic_seed"),
    "captions_json": setting([], "coco: captions_*.json files (repeat the flag); the split is "
                             "read from the file name, or given as split=path.",
                             kind=list[str], check=ExistingPath("captions file")),
    "karpathy_json": setting(None, "karpathy: the split file, e.g. dataset_coco.json.",
                             kind=str, check=ExistingPath("split file")),
    "flickr8k_captions": setting(None, "flickr8k: captions.txt (CSV) or Flickr8k.token.txt.",
                                 kind=str, check=ExistingPath("captions file")),
    "flickr8k_splits_dir": setting(None, "flickr8k: folder of Flickr_8k.{train,dev,test}"
                                   "Images.txt (default: beside the captions file).",
                                   kind=str, check=ExistingPath("folder")),
    "cc_train_tsv": setting(None, "conceptual: the training TSV (caption<TAB>URL), "
                            "Train_GCC-training.tsv.", kind=str, check=ExistingPath("TSV file")),
    "cc_val_tsv": setting(None, "conceptual: the validation TSV, Validation_GCC-1.1.0-"
                          "Validation.tsv (halved into val and test).", kind=str,
                          check=ExistingPath("TSV file")),
    "cc_image_names": setting("url_sha1", "conceptual: how the downloaded images are named: "
                              "url_sha1 (<sha1 hex of the URL>.jpg, the TensorFlow tutorial's "
                              "downloader) or row (the line's 0-based row in its TSV, "
                              "img2dataset; images of each TSV in <image_dir>/train and "
                              "<image_dir>/val).", choices=CC_IMAGE_NAMES),
    "image_dir": setting(None, "coco, karpathy, flickr8k, conceptual: the images' root folder.",
                         kind=str, check=ExistingPath("image folder")),
    "max_images": setting(0, "Keep at most this many images per split (0: all): a fixed "
                          "sample, the images with the smallest sha256 of their id.",
                          check=NON_NEGATIVE),
    "min_caption_words": setting(0, "Drop captions with fewer words (after standardisation; "
                                 "0: keep all).", check=NON_NEGATIVE),
}, kw_only=True)

# What each dataset needs besides --dataset.
DATASET_NEEDS = {"coco": ("captions_json", "image_dir"), "karpathy": ("karpathy_json", "image_dir"),
                 "flickr8k": ("flickr8k_captions", "image_dir"),
                 "conceptual": ("cc_train_tsv", "image_dir")}
DATASET_RULES = tuple(
    Rule(("dataset", need), lambda dataset, value, name=name: dataset != name or bool(value),
         f"--dataset={name} needs --{need}")
    for name, needs in DATASET_NEEDS.items() for need in needs)


def _weights_ok(value: str) -> bool:
    return value in ("imagenet", "none") or os.path.exists(value)


# Positional for the library's callers: ExtractionSettings("coco", "resnet50", "imagenet").
ExtractionSettings = _declare("ExtractionSettings", "Everything that decides the bytes of a "
                              "cache; a re-run must use the same.", {
    "dataset": setting("synthetic", "The caption dataset (a dataset setting).", flag=False),
    "backbone": setting("patches", "The frozen image backbone.", choices=BACKBONES),
    "weights": setting("imagenet", "Backbone weights: imagenet, none (random), or a Keras "
                       "weights file; vit, clip, siglip: a local keras_hub preset folder.",
                       check=Check(_weights_ok, "must be imagenet, none, an existing weights "
                                   "file or a keras_hub preset folder")),
    "feature_dtype": setting("float16", "Stored feature dtype.", choices=FEATURE_DTYPES),
    "shard_size": setting(256, "Images per cache shard.", check=POSITIVE),
    "vocab_size": setting(5000, "Vocabulary size, special tokens included.",
                          check=Check(lambda v: v > 4, "must be above 4 (the special tokens)")),
    "min_count": setting(1, "A word enters the vocabulary if seen this often.", check=POSITIVE),
    "class_token": setting("drop", "vit, clip: the encoder's class token: drop (the grid is its "
                           "h x w patch tokens) or keep (the grid is one row of 1 + h*w cells, "
                           "the class token first); the other backbones have none (siglip "
                           "included): drop only.", choices=CLASS_TOKEN),
})

ExtractionRun = _declare("ExtractionRun", "Where the cache goes and how it is computed, beyond "
                         "what decides its bytes.", {
    "cache_dir": setting(None, "Feature cache folder (default data/cache/<dataset>-<backbone>).",
                         kind=str),
    "extract_batch_size": setting(32, "Images per backbone call.", check=POSITIVE),
    "overwrite": setting(False, "Rebuild a cache made with other settings."),
}, kw_only=True)

# One extraction process's share of the work: the launcher sets these itself.
ExtractionTask = _declare("ExtractionTask", "This process's share of an extraction.", {
    "task_index": setting(None, "This process's index among --num_tasks cooperating "
                          "extraction processes (default: from TF_CONFIG, or "
                          "JOB_COMPLETION_INDEX with DIST_CAPTION_WORKERS, else 0 of 1).",
                          kind=int, check=NON_NEGATIVE),
    "num_tasks": setting(None, "How many processes share the extraction (each takes every N-th "
                         "shard).", kind=int, check=POSITIVE),
    "extract_wait_timeout": setting(3600.0, "Seconds a task waits for task 0's preparation, "
                                    "task 0 for the other tasks' shards, and they for the "
                                    "manifest, before failing.", check=POSITIVE),
}, kw_only=True)


def default_cache_dir(dataset: str, backbone: str) -> str:
    return os.path.join(DEFAULT_DATA_ROOT, "cache", f"{dataset}-{backbone}")


# ---------------------------------------------------------------------------------- launcher

LaunchSettings = _declare("LaunchSettings", "`launch/train.sh` (python -m dist_caption.launch): "
                          "its own options; every other argument goes to each worker.", {
    "workers": setting(1, "Local worker processes.", check=AT_LEAST_ONE),
    "startup_timeout": setting(300.0, "Seconds for every worker to join the cluster, else exit "
                               "3.", check=Check(lambda v: v > 0, "must be a positive number "
                                                 "of seconds")),
    "grace_seconds": setting(60.0, "After forwarding SIGINT/SIGTERM, seconds before SIGKILL.",
                             check=NON_NEGATIVE),
    "failure_grace_seconds": setting(15.0, "After a worker failed, seconds before the others "
                                     "are SIGKILLed.", check=NON_NEGATIVE),
    "max_restarts": setting(3, "When a worker fails (signal, error, lost peer, no join), stop "
                            "every worker and start them all again, resuming from the last "
                            "checkpoint, at most this many times (0: stop at the first "
                            "failure).", check=NON_NEGATIVE),
    "log_dir": setting(None, "Write each worker's whole output to DIR/worker-<i>.log (default: "
                       "<--model_dir>/worker-logs when a local --model_dir is given); the "
                       "console then leaves out TensorFlow's known start-up and checkpoint "
                       "notices (dist_caption.console.NOISE). Without a log, every line is "
                       "shown.", kind=str),
    "module": setting("dist_caption.train", "The worker's Python module."),
    "cpu": setting(False, "Hide GPUs (CUDA_VISIBLE_DEVICES=-1)."),
    "gpus_per_worker": setting(None, "GPUs of this host given to each local worker, a disjoint "
                               "slice each (default: the host's GPUs split evenly over "
                               "--workers).", kind=int,
                               check=Check(lambda v: v >= 1, "must be at least 1 (use --cpu to "
                                           "train without GPUs)")),
    "pod": setting(False, "Become this Kubernetes Indexed Job pod's worker (TF_CONFIG from "
                   "env)."),
    "prepare": setting(False, "Always run extract_features first."),
    "no_prepare": setting(False, "Never run extract_features."),
}, kw_only=True)
LAUNCH_RULES = (
    Rule(("cpu", "gpus_per_worker"), lambda cpu, gpus: not (cpu and gpus),
         "cpu hides every GPU: drop gpus_per_worker or cpu"),
    Rule(("pod", "gpus_per_worker"), lambda pod, gpus: not (pod and gpus),
         "gpus_per_worker is for local workers: a pod's worker uses the GPUs Kubernetes gives "
         "its container (nvidia.com/gpu)"),
    Rule(("prepare", "no_prepare"), lambda always, never: not (always and never),
         "prepare and no_prepare contradict each other: give one or neither"),
)


def preparation_settings() -> list[dataclasses.Field]:
    """The settings that `launch/train.sh` passes on to the data preparation (extract_features):
    the dataset's, the extraction's and the cache's (not a task's share, which it sets)."""
    return [f for cls in (DatasetSettings, ExtractionSettings, ExtractionRun)
            for f in settings(cls)]


# ------------------------------------------------------------------------------------ export

def _batch_sizes_ok(sizes) -> bool:
    return all(str(s).isdigit() and int(s) > 0 for s in sizes)


ExportSettings = _declare("ExportSettings", "`python -m dist_caption.export`: where, and the "
                          "limits and compilation of the serving signatures.", {
    "export_base": setting(DEFAULT_EXPORT_BASE, "Folder of numbered versions (the "
                           "model_base_path TensorFlow Serving watches); the export goes to "
                           "<export_base>/<version>."),
    "version": setting(0, "Version number to write (0: the next free integer).",
                       check=NON_NEGATIVE),
    "export_xla": setting(False, "Compile the greedy decoder with XLA (TensorFlow Serving then "
                          "needs --xla_cpu_compilation_enabled=true or "
                          "--xla_gpu_compilation_enabled=true)."),
    "max_image_pixels": setting(MAX_PIXELS, "Images with more pixels (width x height, read from "
                                "the header before decoding) are refused.", check=POSITIVE),
    "max_batch": setting(MAX_BATCH, "Most images per request.", check=POSITIVE),
    "max_beam": setting(MAX_BEAM, "Widest beam the beam_search signature accepts.",
                        check=POSITIVE),
    "model_name": setting(DEFAULT_MODEL_NAME, "Model name written in the warm-up requests (the name "
                          "TensorFlow Serving serves the model under)."),
    "warmup_batch_sizes": setting([str(b) for b in WARMUP_BATCH_SIZES],
                                  "Batch sizes of the serving_default warm-up requests (also "
                                  "caption_features with --export_xla), up to --max_batch: the "
                                  "server's allowed_batch_sizes, so XLA compiles every shape "
                                  "before traffic.",
                                  check=Check(_batch_sizes_ok, "must be positive integers, e.g. "
                                              "1,2,4,8,16,32,64")),
}, kw_only=True)


# ----------------------------------------------------------- evaluation, prediction, report

RunSettings = _declare("RunSettings", "Which trained run (and checkpoint) to use, and the cache "
                       "it was trained on.", {
    "model_dir": setting(DEFAULT_MODEL_DIR, "The training run.",
                         check=ExistingPath("training run folder")),
    "checkpoint": setting("best", "best, latest, or a checkpoint path."),
    "cache_dir": setting(None, "Feature cache (default: the one trained on).", kind=str,
                         check=ExistingPath("feature cache")),
}, kw_only=True)

EvaluateSettings = _declare("EvaluateSettings", "`python -m dist_caption.evaluate`.", {
    "split": setting("test", "Split to caption.", choices=SPLITS),
    "limit": setting(0, "Caption only the first N images (0: all).", check=NON_NEGATIVE),
    "out": setting(None, "JSON output (default <model_dir>/eval-<split>.json).", kind=str),
    "beam": setting(0, "Beam width (0: greedy decoding, as training evaluates).",
                    check=NON_NEGATIVE),
    "length_penalty": setting(0.0, "With --beam: rank the final beams by log-probability / "
                              "length**A (0: the summed log-probability).", check=NON_NEGATIVE),
    "no_repeat_ngram": setting(0, "Decode as a client asking no_repeat_ngram N does: never "
                               "repeat an n-gram of N words in a caption (3: self-critical."
                               "pytorch's trigram blocking; 0: off).", check=NON_NEGATIVE),
}, kw_only=True)


def _saved_model():
    return setting(DEFAULT_EXPORT_BASE, "An export version folder, or a base folder (its "
                   "newest version).", check=ExistingPath("export folder"))


PredictSettings = _declare("PredictSettings", "`python -m dist_caption.predict`.", {
    "saved_model": _saved_model(),
    "beam": setting(0, "Beam width (0: greedy with serving_default).", check=NON_NEGATIVE),
    "attention_png": setting(None, "Draw each word's attention map into this PNG.", kind=str),
}, kw_only=True)

ReportSettings = _declare("ReportSettings", "`python -m dist_caption.report` (with the dataset "
                          "settings).", {
    "saved_model": _saved_model(),
    "split": setting("test", "Split to caption.", choices=SPLITS),
    "limit": setting(0, "Only the first N images of the split (0: all).", check=NON_NEGATIVE),
    "out": setting("report.html", "The HTML page to write."),
}, kw_only=True)


# ------------------------------------------------------------------- checks before TensorFlow

def batch_split_error(training: TrainSettings, replicas: int) -> str | None:
    """What is wrong with splitting `training`'s global batch over `replicas`, or None."""
    global_batch_size = training.global_batch_size
    # SCST batches images: --captions_per_image does not apply.
    captions_per_image = training.captions_per_image if training.objective != "scst" else 0
    if global_batch_size % replicas:
        return (f"--global_batch_size {global_batch_size} does not split over {replicas} "
                f"replicas: use a multiple of {replicas}")
    per_replica = global_batch_size // replicas
    if captions_per_image and per_replica % captions_per_image:
        return (f"--captions_per_image {captions_per_image} does not divide the {per_replica} "
                f"captions of each replica's batch (--global_batch_size {global_batch_size} "
                f"over {replicas} replica(s)): use a divisor of {per_replica}")
    return None


def check_training_args(args: list[str], replicas: int | None) -> None:
    """Raises ValueError on the first training flag in `args` that breaks a declaration or a
    rule, and on a global batch that does not split over `replicas` (None: unknown). What
    `launch/train.sh` checks before it prepares any data; imports no TensorFlow."""
    model, training = from_args(ModelSettings, args), from_args(TrainSettings, args)
    check(model, MODEL_RULES)
    check(training, TRAIN_RULES)
    if replicas:
        error = batch_split_error(training, replicas)
        if error:
            raise ValueError(error)
