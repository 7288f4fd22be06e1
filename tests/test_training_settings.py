"""Each training and model setting does what it says: a changed value changes what the run
does (the schedule, the batches, the step's loss and update, the checkpoints, the logs, when it
stops), so a setting the trainer ignored would fail here. tests/test_settings.py checks that
every setting has such a test.

Two kinds: whole runs (`training.run`, the path users take) for what the loop decides, and single
steps through the trainer's own parts (`build_model_and_optimizer`, `train_dataset`,
`Stepper`), run eagerly, for what happens inside a step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from dist_caption import config, run_dir, training
from dist_caption.data import pipeline
from dist_caption.model import build_captioner

# Its module fixtures train whole runs: one xdist worker runs all its tests (launch/test.sh).
pytestmark = pytest.mark.xdist_group("training_settings")

DEFAULTS = {f.name: f.default for f in dataclasses.fields(config.TrainConfig)
            if f.default is not dataclasses.MISSING}


def tiny(cache_dir: str, model_dir: str, **overrides) -> training.TrainConfig:
    return training.TrainConfig(cache_dir=cache_dir, model_dir=model_dir, **{**TINY, **overrides})


def scalars(model_dir: str, tag: str) -> dict[int, float]:
    return training.logged_scalars(model_dir, tag)


def texts(model_dir: str, tag: str) -> dict[int, str]:
    """step -> the text summary `tag` in the run's TensorBoard logs."""
    out = {}
    for path in tf.io.gfile.glob(os.path.join(run_dir.logs_dir(model_dir), "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    out[event.step] = tf.make_ndarray(value.tensor).item().decode()
    return out


def checkpoint_value(model_dir: str, name: str):
    """A loop variable (step, epoch, best, bad_epochs) in the run's latest checkpoint."""
    path = tf.train.latest_checkpoint(run_dir.checkpoints_dir(model_dir))
    return tf.train.load_checkpoint(path).get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")


def expected_learning_rate(cfg: training.TrainConfig, total_steps: int, step: int) -> float:
    """Linear warm-up from 0 to the peak over `warmup_steps`, then cosine decay to
    `min_lr_ratio` of the peak at the last step, written out by hand."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    if step < warmup:
        return peak * step / warmup
    decay = max(1, total_steps - warmup)
    done = min(step - warmup, decay) / decay
    return peak * ((1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))
                   + cfg.min_lr_ratio)


# ---------------------------------------------------------------------------------- whole runs

# 8 steps: warm-up over the first 4, cosine decay to a quarter of the peak over the other 4; a
# summary every 2nd step, a checkpoint every step (2 kept), 2 captions at the epoch's end.
SCHEDULE = dict(epochs=1, steps_per_epoch=8, warmup_steps=4, learning_rate=2e-3,
                min_lr_ratio=0.25, log_every=2, checkpoint_every=1, keep_checkpoints=2,
                eval_images=2, early_stopping_metric="val_loss")


@pytest.fixture(scope="module")
def schedule_run(tiny_cache, tmp_path_factory):
    """(config, model_dir, final metrics) of a run with `SCHEDULE`."""
    model_dir = str(tmp_path_factory.mktemp("schedule") / "run")
    cfg = tiny(tiny_cache[1], model_dir, **SCHEDULE)
    return cfg, model_dir, training.run(cfg)


@pytest.mark.setting("learning_rate", "warmup_steps", "min_lr_ratio")
def test_learning_rate_warms_up_linearly_then_decays_to_min_lr_ratio(schedule_run):
    cfg, model_dir, _ = schedule_run
    schedule = training.learning_rate_schedule(cfg, 8)
    want = [expected_learning_rate(cfg, 8, s) for s in range(9)]
    np.testing.assert_allclose([float(schedule(s)) for s in range(9)], want, rtol=1e-5)
    # 0, 1/4, 2/4, 3/4 of the peak, the peak, then down to min_lr_ratio of it.
    np.testing.assert_allclose(want[:5], [0, 5e-4, 1e-3, 1.5e-3, 2e-3], rtol=1e-6)
    assert want[8] == pytest.approx(0.25 * 2e-3)
    # What the run logged after each logged step is the schedule at that step.
    logged = scalars(model_dir, "train/learning_rate")
    assert sorted(logged) == [2, 4, 6, 8]
    np.testing.assert_allclose([logged[s] for s in (2, 4, 6, 8)],
                               [1e-3, 2e-3, want[6], 0.25 * 2e-3], rtol=1e-5)


@pytest.mark.setting("log_every")
def test_summaries_are_written_every_log_every_steps(schedule_run):
    _, model_dir, _ = schedule_run
    for tag in ("train/loss", "train/grad_norm", "train/learning_rate", "train/loss_scale"):
        assert sorted(scalars(model_dir, tag)) == [2, 4, 6, 8], tag


@pytest.mark.setting("checkpoint_every", "keep_checkpoints")
def test_checkpoints_every_n_steps_keep_the_newest_n(schedule_run):
    _, model_dir, _ = schedule_run
    state = tf.train.get_checkpoint_state(run_dir.checkpoints_dir(model_dir))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-7",
                                                                              "ckpt-8"]


@pytest.mark.setting("eval_images")
def test_each_epoch_logs_the_captions_of_eval_images_to_tensorboard(schedule_run, tiny_cache):
    _, model_dir, metrics = schedule_run
    assert {"CIDEr", "BLEU-4", "scene_accuracy"} <= set(metrics)
    samples = texts(model_dir, "val/samples")
    assert sorted(samples) == [8]  # after the epoch
    val_ids = {i.decode() for b in pipeline.image_dataset(tiny_cache[1], "val", 8)
               for i in b["image_id"].numpy()}
    for text in samples.values():
        lines = text.split("\n\n")
        assert len(lines) == 2, text  # --eval_images 2
        ids = [line.split(": ", 1)[0] for line in lines]
        assert set(ids) <= val_ids and len(set(ids)) == 2, text
        assert all(line.split(": ", 1)[1].strip() for line in lines), text


@pytest.mark.setting("early_stopping_metric")
def test_the_best_checkpoint_is_chosen_by_early_stopping_metric(schedule_run):
    _, model_dir, metrics = schedule_run
    assert "CIDEr" in metrics  # there was a caption metric to choose instead
    losses = scalars(model_dir, "val/val_loss")
    assert sorted(losses) == [8]
    # `best` is the metric's best value, negated for a loss.
    assert checkpoint_value(model_dir, "best") == pytest.approx(-losses[8])


@pytest.mark.setting("ema_decay")
def test_ema_decay_keeps_the_average_that_validation_and_export_use(tiny_cache,
                                                                          tmp_path):
    """Two runs, with and without `--ema_decay 0.3`, a checkpoint every step: the average
    follows average = d * average + (1 - d) * weights from checkpoint to checkpoint, with
    Model Garden's dynamic decay d = min(0.3, (1 + n) / (10 + n)) after n updates (0.25 at
    step 2, 0.3 from step 3); the weights
    themselves are the run's without EMA, bit for bit; the logged validation loss is the
    averaged model's (recomputed here through the trainer's own evaluation); restoring (what
    evaluate, export and --init_from do) gives the average, and so does the export; a stage
    started from the run begins its own average at those averaged weights. (A resumed
    run's average: test_train.py's resume test; across strategies: its equal-weights test.)"""
    from conftest import averages_of, raw_weights_of
    from dist_caption import exporting

    cache_dir = tiny_cache[1]
    keep = dict(steps_per_epoch=4, checkpoint_every=1, keep_checkpoints=10)
    plain = tiny(cache_dir, str(tmp_path / "plain"), **keep)
    ema = dataclasses.replace(plain, model_dir=str(tmp_path / "ema"), ema_decay=0.3)
    plain_metrics, ema_metrics = training.run(plain), training.run(ema)

    def saved_averages(step: int) -> list[np.ndarray]:
        reader = tf.train.load_checkpoint(
            os.path.join(run_dir.checkpoints_dir(ema.model_dir), f"ckpt-{step}"))
        assert reader.get_tensor("ema/updates/.ATTRIBUTES/VARIABLE_VALUE") == step
        return [reader.get_tensor(f"ema/averages/{i}/.ATTRIBUTES/VARIABLE_VALUE")
                for i in range(len(model.trainable_weights))]

    model = build_captioner(run_dir.model_config(run_dir.load(ema.model_dir)))
    position = {id(v): i for i, v in enumerate(model.weights)}
    for step, decay in ((2, 0.25), (3, 0.3), (4, 0.3)):
        assert decay == pytest.approx(min(0.3, (1 + step) / (10 + step)))
        before, now = saved_averages(step - 1), saved_averages(step)
        weights = raw_weights_of(ema.model_dir, os.path.join(
            run_dir.checkpoints_dir(ema.model_dir), f"ckpt-{step}"))
        for i, weight in enumerate(model.trainable_weights):
            np.testing.assert_allclose(
                now[i], decay * before[i] + (1 - decay) * weights[position[id(weight)]],
                rtol=1e-5, atol=1e-7, err_msg=f"average {i} at step {step}")
    for got, want in zip(raw_weights_of(ema.model_dir), raw_weights_of(plain.model_dir)):
        np.testing.assert_array_equal(got, want)

    # Validation ran on the average: recompute it with the averaged weights.
    strategy = tf.distribute.get_strategy()
    manifest = pipeline.load_manifest(cache_dir)
    model, _ = run_dir.restore(ema.model_dir, "latest")
    for got, want in zip(model.trainable_weights, averages_of(ema.model_dir)):
        np.testing.assert_array_equal(got.numpy(), want)
    stepper = training.Stepper(strategy, model, None, dataclasses.replace(ema, ema_decay=0.0),
                               "float32", False)
    again = training.evaluate_epoch(strategy, stepper, ema, manifest,
                                    iter(training.val_dataset(strategy, ema, manifest)), 1,
                                    True, model)
    assert again["val_loss"] == pytest.approx(ema_metrics["val_loss"], rel=1e-5)
    assert abs(ema_metrics["val_loss"] - plain_metrics["val_loss"]) > 1e-3

    # The export holds the averaged weights.
    path = exporting.export(ema.model_dir, str(tmp_path / "export"), checkpoint="latest",
                            max_batch=2, warmup_batch_sizes=(1,))
    with open(os.path.join(path, exporting.MODEL_CARD_FILE)) as f:
        assert json.load(f)["checkpoint"]["averaged_weights"] is True
    exported = [v.numpy() for v in tf.saved_model.load(path).model_variables]  # model.variables
    position = {id(v): i for i, v in enumerate(model.variables)}
    for weight, want in zip(model.trainable_weights, averages_of(ema.model_dir)):
        np.testing.assert_array_equal(exported[position[id(weight)]], want)

    # A stage started with --init_from this run begins from its averaged (best) weights, and
    # its own average starts there: after 1 update (d = min(0.3, 2/11)) it is
    # d * those weights + (1 - d) * the weights after the step.
    start = averages_of(ema.model_dir, "best")
    stage = dataclasses.replace(ema, model_dir=str(tmp_path / "stage"), init_from=ema.model_dir,
                                max_steps=1)
    training.run(stage)
    decay = 2 / 11
    after = raw_weights_of(stage.model_dir)
    for i, (got, weight) in enumerate(zip(averages_of(stage.model_dir),
                                          model.trainable_weights)):
        np.testing.assert_allclose(got, decay * start[i] + (1 - decay) * after[
            position[id(weight)]], rtol=1e-5, atol=1e-7, err_msg=f"average {i}")


@pytest.mark.setting("patience", "train:seed", "xla")
def test_early_stopping_stops_after_patience_epochs_without_improvement(tiny_cache, tmp_path,
                                                                        caplog):
    """A learning rate too small to move any weight: val_loss never improves after epoch 1,
    so with --patience 2 the run stops after epoch 3 of 10."""
    cache_dir, model_dir = tiny_cache[1], str(tmp_path / "run")
    cfg = tiny(cache_dir, model_dir, epochs=10, steps_per_epoch=1, patience=2,
               learning_rate=1e-30, early_stopping_metric="val_loss", seed=1)
    with caplog.at_level(logging.INFO, logger="absl"):
        training.run(cfg)
    assert "float32, xla=False" in caplog.text  # --xla false, not the CPU's auto (on)
    assert "early stopping: val_loss has not improved for 2 epochs" in caplog.text
    losses = scalars(model_dir, "val/val_loss")
    assert sorted(losses) == [1, 2, 3]
    assert len(set(losses.values())) == 1, losses  # no improvement, as intended
    assert checkpoint_value(model_dir, "epoch") == 3
    assert checkpoint_value(model_dir, "bad_epochs") == 2
    # The weights did not move: they are the initial weights of --seed 1, not of seed 0.
    trained = [w.numpy() for w in run_dir.restore(model_dir, "latest")[0].weights]
    manifest = pipeline.load_manifest(cache_dir)
    for seed, same in ((1, True), (0, False)):
        keras.utils.set_random_seed(seed)
        fresh = build_captioner(cfg.model_config(manifest),
                                token_counts=manifest["train_token_counts"])
        equal = all(np.allclose(a, b.numpy(), rtol=0, atol=1e-12)
                    for a, b in zip(trained, fresh.weights))
        assert equal == same, f"seed {seed}"


@pytest.mark.setting("strategy", "cpu_devices", "heartbeat_timeout", "collective_timeout")
def test_the_strategy_is_made_with_the_strategy_settings(tiny_cache, tmp_path, monkeypatch):
    """What `make_strategy` (tested with its arguments in test_train.py and test_faults.py)
    is given; it is made first, before any other TensorFlow op, so it is stopped there."""
    made = []

    class Made(Exception):
        pass

    def spy(name, cpu_devices=0, timeouts=training.ClusterTimeouts()):
        made.append((name, cpu_devices, timeouts))
        raise Made

    monkeypatch.setattr(training, "make_strategy", spy)
    with pytest.raises(Made):
        training.run(tiny(tiny_cache[1], str(tmp_path / "run"), strategy="mirrored", cpu_devices=3,
                       heartbeat_timeout=7.5, collective_timeout=4.0))
    assert made == [("mirrored", 3, training.ClusterTimeouts(heartbeat=7.5, collective=4.0))]


# ------------------------------------------------------------------ inside a step, one at a time

def first_batch(cfg: training.TrainConfig) -> dict:
    """The first global batch the trainer's input pipeline gives `cfg` (one replica)."""
    strategy = tf.distribute.get_strategy()
    manifest = pipeline.load_manifest(cfg.cache_dir)
    return next(iter(training.train_dataset(strategy, cfg, manifest, skip=0)))


@pytest.mark.setting("shuffle", "train:seed", "captions_per_image", "global_batch_size",
                     "max_len", "steps_per_epoch")
def test_the_input_pipeline_follows_the_batch_settings(tiny_cache, tmp_path):
    cache_dir, model_dir = tiny_cache[1], str(tmp_path / "run")
    manifest = pipeline.load_manifest(cache_dir)
    base = dict(shuffle=True, seed=0, global_batch_size=20, max_len=24, captions_per_image=0)

    def tokens(**overrides):
        return first_batch(tiny(cache_dir, model_dir, **{**base, **overrides}))["tokens"].numpy()

    first = tokens()
    assert first.shape == (20, 24)
    assert not np.array_equal(tokens(shuffle=False), first)
    assert not np.array_equal(tokens(seed=1), first)
    np.testing.assert_array_equal(tokens(), first)  # the order is the seed's, reproducibly
    assert tokens(global_batch_size=10, max_len=12).shape == (10, 12)
    grouped = first_batch(tiny(cache_dir, model_dir, **{**base, "captions_per_image": 5}))
    assert grouped["features"].shape[0] == 4 and grouped["tokens"].shape[0] == 20
    np.testing.assert_array_equal(grouped["image_index"], np.repeat(np.arange(4), 5))
    # --steps_per_epoch 0: one pass over the 160 training captions.
    captions = manifest["splits"]["train"]["captions"]
    assert captions == 160
    assert training.steps_per_epoch(tiny(cache_dir, model_dir, steps_per_epoch=0,
                                      global_batch_size=40), manifest) == 4
    assert training.steps_per_epoch(tiny(cache_dir, model_dir, steps_per_epoch=3), manifest) == 3


def stepper_for(cfg: training.TrainConfig, precision: str = "float32"):
    """(Stepper, model, its first batch iterator) as `training.run` builds them (eager)."""
    keras.utils.set_random_seed(cfg.seed)
    strategy = tf.distribute.get_strategy()
    manifest = pipeline.load_manifest(cfg.cache_dir)
    model, optimizer = training.build_model_and_optimizer(strategy, cfg, manifest, total_steps=10)
    reward = training.cider_reward(strategy, cfg, manifest, True) if cfg.objective == "scst" \
        else None
    stepper = training.Stepper(strategy, model, optimizer, cfg, precision, xla=False,
                            reward=reward)
    return stepper, model, iter(training.train_dataset(strategy, cfg, manifest, skip=0))


def one_step(cfg: training.TrainConfig) -> dict:
    """The statistics of the first training step (applied) under `cfg`, run eagerly."""
    stepper, _, batches = stepper_for(cfg)
    out = stepper._train_step(batches, tf.constant(0.0), tf.constant(0, tf.int64))
    assert bool(out["applied"])
    return {k: float(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def plain_step(tiny_cache, tmp_path_factory):
    """The first step's statistics without dropout, smoothing or zeroed features."""
    return one_step(tiny(tiny_cache[1], str(tmp_path_factory.mktemp("plain") / "run"),
                         dropout=0.0, label_smoothing=0.0, zero_features=False))


@pytest.mark.setting("dropout", "label_smoothing", "zero_features")
@pytest.mark.parametrize("name, value", [("dropout", 0.5), ("label_smoothing", 0.1),
                                         ("zero_features", True)])
def test_the_first_steps_loss_changes_with_the_setting(tiny_cache, tmp_path, plain_step, name,
                                                       value):
    """Same weights, same batch: dropout masks, smoothed targets or zeroed features change the
    training loss of the very first step."""
    plain = dict(dropout=0.0, label_smoothing=0.0, zero_features=False)
    changed = one_step(tiny(tiny_cache[1], str(tmp_path / "run"), **{**plain, name: value}))
    assert changed["tokens"] == plain_step["tokens"]  # the same batch
    assert abs(changed["loss"] - plain_step["loss"]) > 1e-3, (changed, plain_step)


def summed_gradients(cfg: training.TrainConfig):
    """(gradients as the step applies them, the step's statistics) for the first batch."""
    stepper, _, batches = stepper_for(cfg)
    grads, stats = stepper.strategy.run(stepper._replica_step, args=(
        next(batches), tf.constant(0.0), tf.constant(0, tf.int64)))
    return grads, stats


@pytest.mark.setting("clip_norm")
def test_clip_norm_bounds_the_global_norm_of_the_applied_gradient(tiny_cache, tmp_path):
    cache_dir, model_dir = tiny_cache[1], str(tmp_path / "run")
    grads, stats = summed_gradients(tiny(cache_dir, model_dir, clip_norm=0.5))
    norm = float(stats["grad_norm"])  # logged as train/grad_norm: before clipping
    assert norm > 1.0, "the gradient is too small for this test"
    assert float(tf.linalg.global_norm(grads)) == pytest.approx(0.5, rel=1e-5)
    unclipped, stats = summed_gradients(tiny(cache_dir, model_dir, clip_norm=0.0))
    assert float(tf.linalg.global_norm(unclipped)) == pytest.approx(float(stats["grad_norm"]),
                                                                    rel=1e-5)
    assert float(stats["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    # Clipping scales the gradient, it does not turn it.
    for a, b in zip(grads, unclipped):
        np.testing.assert_allclose(tf.convert_to_tensor(a), tf.convert_to_tensor(b) * 0.5 / norm,
                                   rtol=1e-4, atol=1e-9)


@pytest.mark.setting("weight_decay")
def test_weight_decay_shrinks_every_weight_by_lr_times_the_decay(tiny_cache, tmp_path):
    """AdamW's decoupled decay: w -= lr * weight_decay * w, besides the Adam update, which is
    the same for any decay (same weights, same gradient)."""
    weights = {}
    for decay in (0.0, 0.5):
        cfg = tiny(tiny_cache[1], str(tmp_path / f"run{decay}"), warmup_steps=0,
                   weight_decay=decay)
        stepper, model, batches = stepper_for(cfg)
        initial = [v.numpy() for v in model.trainable_variables]
        stepper._train_step(batches, tf.constant(0.0), tf.constant(0, tf.int64))
        weights[decay] = [v.numpy() for v in model.trainable_variables]
    lr = cfg.learning_rate  # the first step's, without warm-up
    for w0, plain, decayed in zip(initial, weights[0.0], weights[0.5]):
        np.testing.assert_allclose(decayed - plain, -0.5 * lr * w0, rtol=1e-3, atol=1e-8)
    assert max(np.abs(w).max() for w in initial) * 0.5 * lr > 1e-4


@pytest.fixture
def float16(request):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_float16_starts_at_the_initial_loss_scale_and_doubles_it_after_clean_steps(
        tiny_cache, tmp_path, float16):
    """The step's own dynamic loss scaling (the overflow half: test_train.py). 2,000 clean
    steps are not run: the count of clean steps is set just below it."""
    cfg = tiny(tiny_cache[1], str(tmp_path / "run"), initial_loss_scale=8.0)
    stepper, _, batches = stepper_for(cfg, "mixed_float16")
    assert float(stepper.loss_scale) == 8.0

    def clean_step():
        out = stepper._train_step(batches, tf.constant(0.0), tf.constant(0, tf.int64))
        assert bool(out["applied"])
        return float(stepper.loss_scale), int(stepper.good_steps)

    assert clean_step() == (8.0, 1)
    stepper.good_steps.assign(1998)
    assert clean_step() == (8.0, 1999)
    stepper.good_steps.assign(2000)
    assert clean_step() == (16.0, 0)  # doubled, and the count starts again
    assert clean_step() == (16.0, 1)


def test_float16_doubles_the_loss_scale_on_the_2000th_clean_step_as_keras_does(
        tiny_cache, tmp_path, float16):
    cfg = tiny(tiny_cache[1], str(tmp_path / "run"), initial_loss_scale=8.0)
    stepper, _, batches = stepper_for(cfg, "mixed_float16")
    stepper.good_steps.assign(1999)  # 1,999 clean steps so far: this one is the 2,000th
    stepper._train_step(batches, tf.constant(0.0), tf.constant(0, tf.int64))
    assert (float(stepper.loss_scale), int(stepper.good_steps)) == (16.0, 0)


# ------------------------------------------------------------------------------- model shape

MANIFEST = {"backbone": "patches", "vocab_size_actual": 20, "feature_shape": [2, 3, 48]}
SHAPE = dict(decoder="transformer", num_layers=1, units=16, num_heads=2, ff_units=8,
             encoder_layers=0, stem="conv", stem_channels=8, max_len=8, dropout=0.0)


def built_model(**overrides):
    cfg = training.TrainConfig(cache_dir="unused", model_dir="unused", **{**SHAPE, **overrides})
    return build_captioner(cfg.model_config(MANIFEST))


@pytest.mark.setting("decoder", "num_layers", "units", "num_heads", "ff_units",
                     "encoder_layers", "stem", "stem_channels", "max_len")
@pytest.mark.parametrize("name, value", [
    ("decoder", "gru_attention"), ("num_layers", 1), ("units", 16), ("num_heads", 4),
    ("ff_units", 8), ("encoder_layers", 1), ("stem", "linear"), ("stem_channels", 8),
    ("max_len", 8)])
def test_each_model_setting_changes_the_model_built_for_a_run(name, value):
    """The captioner a run builds (`TrainConfig.model_config`) with the setting's value is
    another model than with its default, which an ignored setting would give: other weights,
    or (--num_heads) other outputs from the same weights."""
    assert value != DEFAULTS[name]
    changed, default = built_model(**{name: value}), built_model(**{name: DEFAULTS[name]})
    shapes = [[tuple(w.shape) for w in m.weights] for m in (changed, default)]
    if shapes[0] != shapes[1]:
        return
    default.set_weights(changed.get_weights())
    rng = np.random.default_rng(0)
    inputs = {"features": tf.constant(rng.uniform(size=(2, *MANIFEST["feature_shape"])),
                                      tf.float32),
              "tokens": tf.constant(rng.integers(4, 20, (2, SHAPE["max_len"] - 1)), tf.int32)}
    assert np.abs(changed(inputs) - default(inputs)).max() > 1e-4


# -------------------------------------------------------------------------------------- SCST

SCST = dict(objective="scst", global_batch_size=4, scst_samples=5, scst_baseline="mean",
            scst_end_token=True, warmup_steps=0)


@pytest.fixture(scope="module")
def scst_step(tiny_cache, tmp_path_factory):
    return one_step(tiny(tiny_cache[1], str(tmp_path_factory.mktemp("scst") / "run"), **SCST))


@pytest.mark.setting("scst_samples", "scst_baseline", "scst_end_token")
@pytest.mark.parametrize("name, value", [("scst_samples", 3), ("scst_baseline", "greedy"),
                                         ("scst_end_token", False)])
def test_the_self_critical_step_follows_its_settings(tiny_cache, tmp_path, scst_step, name,
                                                     value):
    """From the same weights: fewer samples per image sample fewer tokens (an image's k-th
    sample is the same whatever the number of samples: it is seeded by its index), the greedy
    baseline is the greedy captions' reward, and without [END] its tokens leave the policy
    gradient."""
    step = one_step(tiny(tiny_cache[1], str(tmp_path / "run"), **{**SCST, name: value}))
    assert scst_step["tokens"] < 4 * 5 * (TINY["max_len"] - 1)  # some samples ended
    if name == "scst_samples":
        assert step["tokens"] < scst_step["tokens"]
    elif name == "scst_baseline":
        assert "greedy_reward" in step and "greedy_reward" not in scst_step
        assert step["reward"] == scst_step["reward"]  # the same samples
        assert step["loss"] != scst_step["loss"]
    else:
        assert step["reward"] == scst_step["reward"]  # the same samples
        assert step["tokens"] < scst_step["tokens"]  # less their [END] tokens
        assert step["loss"] != scst_step["loss"]
