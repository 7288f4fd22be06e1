"""The training run folder: its layout, writing its description, restoring a model from it.

    <model_dir>/
      run.json           the model config, the training config, the cache it was trained on
      vocab.txt          the cache's vocabulary (the model's token ids)
      checkpoints/       the latest --keep_checkpoints checkpoints (model, optimizer, loop state)
      best/              the best checkpoint by --early_stopping_metric
      logs/              TensorBoard
      cider_df.npz       --objective scst: the training references' n-gram document
                         frequencies, counted once at the start and fixed for the run
      eval-<split>.json  what `python -m dist_caption.evaluate` wrote
      worker-logs/       every line each worker of `launch/train.sh` printed

Training (`train.py`) writes it, and only the chief; evaluation, export and the benchmarks read
it through `load`, `vocabulary` and `restore`, which rebuild the model with `build_captioner`,
the one build path.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf
from absl import logging

from dist_caption.config import ModelConfig, TrainConfig
from dist_caption.errors import UserError
from dist_caption import files, provenance
from dist_caption.files import read_json, write_json_atomic

RUN_FILE = "run.json"
VOCAB_FILE = "vocab.txt"
CHECKPOINTS = "checkpoints"
BEST = "best"
LOGS = "logs"
CIDER_DF_FILE = "cider_df.npz"


def checkpoints_dir(model_dir: str) -> str:
    return os.path.join(model_dir, CHECKPOINTS)


def best_dir(model_dir: str) -> str:
    return os.path.join(model_dir, BEST)


def logs_dir(model_dir: str) -> str:
    return os.path.join(model_dir, LOGS)


def cider_df_file(model_dir: str) -> str:
    return os.path.join(model_dir, CIDER_DF_FILE)


def eval_file(model_dir: str, split: str) -> str:
    return os.path.join(model_dir, f"eval-{split}.json")


def eval_files(model_dir: str) -> dict[str, str]:
    """{split: path} of the `eval_file`s in the run (any storage tf.io.gfile reads)."""
    found = tf.io.gfile.glob(eval_file(model_dir, "*"))
    return {os.path.basename(p)[len("eval-"):-len(".json")]: p for p in sorted(found)}


def write(cfg: TrainConfig, manifest: dict, model_config: ModelConfig) -> None:
    """`run.json` and the vocabulary: everything evaluation and export rebuild the model from."""
    files.makedirs(cfg.model_dir)
    files.copy(os.path.join(cfg.cache_dir, manifest["vocab_file"]),
               os.path.join(cfg.model_dir, VOCAB_FILE))
    write_json_atomic(os.path.join(cfg.model_dir, RUN_FILE), {
        "model": dataclasses.asdict(model_config),
        "train": dataclasses.asdict(cfg),
        "cache_dir": files.absolute(cfg.cache_dir),
        "vocab_sha256": manifest["vocab_sha256"],
        "backbone": manifest["backbone"],
        "input_size": manifest["input_size"],
        "dataset": manifest["dataset"],
        "zero_features": cfg.zero_features,
        "code": provenance.code_version(),  # the export's model card carries it
    })


def load(model_dir: str) -> dict:
    """The run description `write` wrote: model config, cache, vocabulary hash."""
    path = os.path.join(model_dir, RUN_FILE)
    if not files.exists(path):
        raise UserError(f"{model_dir} is not a training run ({RUN_FILE} missing): pass the "
                        f"--model_dir that python -m dist_caption.train wrote")
    return read_json(path)


def model_config(run: dict) -> ModelConfig:
    return ModelConfig.from_dict(run["model"])


def vocabulary(model_dir: str):
    from dist_caption.data.text import Vocabulary

    return Vocabulary.load(os.path.join(model_dir, VOCAB_FILE))


def checkpoint_path(model_dir: str, checkpoint: str = "best") -> str:
    """The checkpoint prefix `checkpoint` names: 'best' (or the latest, if no best was kept
    yet), 'latest', or a path."""
    if checkpoint not in ("best", "latest"):
        if not files.exists(f"{checkpoint}.index"):
            raise UserError(f"--checkpoint {checkpoint} is not a checkpoint (no "
                            f"{checkpoint}.index): pass best, latest, or a checkpoint's path "
                            f"without its suffix, e.g. {checkpoints_dir(model_dir)}/ckpt-40")
        return checkpoint
    path = tf.train.latest_checkpoint(best_dir(model_dir) if checkpoint == "best"
                                      else checkpoints_dir(model_dir))
    if path is None and checkpoint == "best":
        path = tf.train.latest_checkpoint(checkpoints_dir(model_dir))
    if path is None:
        raise UserError(f"no checkpoint in {model_dir}: train first, or pass --checkpoint")
    return path


def restore(model_dir: str, checkpoint: str = "best"):
    """(the run's captioner with `checkpoint` restored, the run description).

    The checkpoint also holds the optimizer and loop state: only the model is wanted, and every
    one of its weights must be there.
    """
    from dist_caption.model.captioner import build_captioner

    run = load(model_dir)
    model = build_captioner(model_config(run))
    path = checkpoint_path(model_dir, checkpoint)
    restore_weights(model, path, run)
    logging.info("restored %s%s", path, " (averaged weights)" if averaged(run) else "")
    return model, run


def averaged(run: dict) -> bool:
    """Whether the run kept an average of its weights (`--ema_decay`): then it is the model."""
    return bool(run.get("train", {}).get("ema_decay"))


def restore_weights(model, path: str, run: dict) -> None:
    """The weights of checkpoint `path` of `run` into `model`: the averaged ones where the run
    kept them. Every one of the model's weights must be there."""
    from dist_caption.model import averaging

    tf.train.Checkpoint(model=model).restore(path).expect_partial() \
        .assert_existing_objects_matched()
    if averaged(run):
        averaging.restore_into(model, path)


def check_init(cfg: TrainConfig, manifest: dict) -> str:
    """The checkpoint `cfg.init_from` names (its best), after checking that the run exists,
    was trained on this vocabulary and has the architecture `cfg` asks for."""
    init = cfg.init_from
    if not files.isdir(init):
        raise UserError(f"--init_from {init} does not exist: pass the --model_dir of a finished "
                        f"cross-entropy run")
    run = load(init)
    if run["vocab_sha256"] != manifest["vocab_sha256"]:
        raise UserError(f"--init_from {init} was trained on another vocabulary than the cache "
                        f"{cfg.cache_dir}: pass the --cache_dir it was trained on "
                        f"({run['cache_dir']})")
    have, want = dataclasses.asdict(model_config(run)), dataclasses.asdict(
        cfg.model_config(manifest))
    differ = [k for k in want if have.get(k) != want[k] and k != "feature_shape"]
    if differ or list(have["feature_shape"]) != list(want["feature_shape"]):
        named = ", ".join(f"--{k}={want[k]} (it has {have[k]})" for k in differ) or \
            f"feature_shape {want['feature_shape']} (it has {have['feature_shape']})"
        raise UserError(f"--init_from {init} has another architecture: {named}; drop these "
                        f"flags, the architecture comes from --init_from")
    return checkpoint_path(init, "best")
