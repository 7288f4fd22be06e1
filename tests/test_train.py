"""Training: one build path, equivalence across replica counts, resume, numerics, signals."""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import (ROOT, TINY_FLAGS, assert_training_errors, losses_of, raw_weights_of,
                      run_module, tiny, weights_of)
from dist_caption import cluster, run_dir, training
from dist_caption.model import build_captioner


# ------------------------------------------------------------------------------------------------
# Strategy, precision and XLA for given devices (no GPU needed: the device lists are passed in)
# ------------------------------------------------------------------------------------------------

GPUS = {n: [f"/physical_device:GPU:{i}" for i in range(n)] for n in (0, 1, 4)}


@pytest.mark.parametrize("gpus, tasks, cpu_devices, want", [
    (0, 0, 0, training.StrategyChoice("default")),
    (1, 0, 0, training.StrategyChoice("default")),  # one GPU: no replicas to mirror
    (4, 0, 0, training.StrategyChoice("mirrored", ("/gpu:0", "/gpu:1", "/gpu:2", "/gpu:3"))),
    (0, 0, 2, training.StrategyChoice("mirrored", ("/cpu:0", "/cpu:1"))),
    (4, 0, 2, training.StrategyChoice("mirrored", ("/gpu:0", "/gpu:1", "/gpu:2", "/gpu:3"))),
    (0, 1, 0, training.StrategyChoice("default")),  # a TF_CONFIG of one task is one process
    # Several workers: each worker's GPUs are its replicas, all-reduced with NCCL; on CPUs
    # with TensorFlow's ring.
    (0, 2, 0, training.StrategyChoice("multi_worker", communication="RING")),
    (1, 2, 0, training.StrategyChoice("multi_worker", communication="NCCL")),
    (4, 4, 0, training.StrategyChoice("multi_worker", communication="NCCL")),
])
def test_auto_strategy_for_given_devices(gpus, tasks, cpu_devices, want):
    assert training.choose_strategy("auto", tasks, GPUS[gpus], cpu_devices) == want


@pytest.mark.parametrize("name, gpus, tasks, want", [
    ("default", 4, 2, training.StrategyChoice("default")),
    ("mirrored", 1, 0, training.StrategyChoice("mirrored", ("/gpu:0",))),
    ("mirrored", 0, 0, training.StrategyChoice("mirrored", ("/cpu:0",))),
    ("multi_worker", 0, 0, training.StrategyChoice("multi_worker", communication="RING")),
    ("multi_worker", 4, 1, training.StrategyChoice("multi_worker", communication="NCCL")),
])
def test_named_strategy_for_given_devices(name, gpus, tasks, want):
    assert training.choose_strategy(name, tasks, GPUS[gpus], 0) == want


def test_tf_config_tasks():
    config = {"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker"}}
    assert cluster.tf_config_tasks({"TF_CONFIG": json.dumps(config)}) == 3
    assert cluster.tf_config_tasks({}) == cluster.tf_config_tasks({"TF_CONFIG": ""}) == 0


@pytest.mark.parametrize("precision, xla, gpus, cpu_devices, want", [
    ("auto", "auto", 0, 0, ("float32", True)),  # measured faster (benchmarks/train_step.py)
    ("auto", "auto", 0, 1, ("float32", True)),
    ("auto", "auto", 0, 2, ("float32", False)),  # logical CPU replicas: measured slower
    ("auto", "auto", 1, 0, ("mixed_float16", True)),
    ("auto", "auto", 4, 0, ("mixed_float16", True)),
    ("mixed_bfloat16", "auto", 0, 0, ("mixed_bfloat16", False)),  # XLA's CPU bf16: slower
    ("mixed_float16", "auto", 0, 0, ("mixed_float16", False)),
    ("mixed_bfloat16", "auto", 1, 0, ("mixed_bfloat16", True)),
    ("float32", "auto", 4, 0, ("float32", True)),
    ("auto", "false", 4, 0, ("mixed_float16", False)),
    ("auto", "false", 0, 0, ("float32", False)),
    ("auto", "true", 0, 2, ("float32", True)),
    ("mixed_bfloat16", "true", 0, 0, ("mixed_bfloat16", True)),
])
def test_precision_and_xla_for_given_devices(precision, xla, gpus, cpu_devices, want):
    assert training.choose_precision_and_xla(precision, xla, GPUS[gpus], cpu_devices) == want


@pytest.mark.setting("epochs", "steps_per_epoch")
def test_training_lowers_the_loss_and_writes_a_restorable_run(tiny_cache, tmp_path, caplog):
    _, cache_dir = tiny_cache
    model_dir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="absl"):  # absl's own level, set by others
        metrics = training.run(tiny(cache_dir, model_dir, epochs=2, steps_per_epoch=6,
                                 eval_images=4, xla="auto"))
    assert "float32, xla=True" in caplog.text  # the CPU default: a compiled step
    losses = losses_of(model_dir)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1]
    for key in ("val_loss", "val_accuracy", "BLEU-4", "CIDEr", "scene_accuracy"):
        assert key in metrics
    run = json.load(open(os.path.join(model_dir, "run.json")))
    assert run["model"]["units"] == 16 and run["model"]["feature_shape"] == [8, 8, 432]
    assert run["model"]["stem"] == "conv"  # --stem auto on the `patches` backbone
    assert os.path.exists(os.path.join(model_dir, "vocab.txt"))
    assert tf.train.latest_checkpoint(os.path.join(model_dir, "best"))

    restored, _ = run_dir.restore(model_dir, "best")
    fresh = build_captioner(run_dir.model_config(run_dir.load(model_dir)))
    assert len(restored.weights) == len(fresh.weights) > 20
    assert not all(np.array_equal(a.numpy(), b.numpy())
                   for a, b in zip(restored.weights, fresh.weights)), "nothing was restored"


@pytest.mark.parametrize("captions_per_image, xla, ema_decay",
                         [(0, "false", 0.0), (5, "true", 0.9)])
def test_resumed_run_repeats_the_uninterrupted_loss_sequence(tiny_cache, tmp_path,
                                                             captions_per_image, xla,
                                                             ema_decay):
    """Stopped mid-epoch and resumed: the same losses and weights (and, with --ema_decay,
    the same weights' average: weights_of restores it) as the uninterrupted run."""
    _, cache_dir = tiny_cache
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    settings = dict(epochs=2, steps_per_epoch=4, dropout=0.2, shuffle=True,
                    captions_per_image=captions_per_image, xla=xla, ema_decay=ema_decay)
    training.run(tiny(cache_dir, whole, **settings))
    training.run(tiny(cache_dir, parts, max_steps=6, **settings))  # stops mid-epoch 2
    assert max(losses_of(parts)) == 6
    training.run(tiny(cache_dir, parts, **settings))
    a, b = losses_of(whole), losses_of(parts)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    for a, b in zip(weights_of(whole), weights_of(parts)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(raw_weights_of(whole), raw_weights_of(parts)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_xla_and_plain_steps_give_the_same_losses(tiny_cache, tmp_path):
    _, cache_dir = tiny_cache
    training.run(tiny(cache_dir, str(tmp_path / "plain"), xla="false"))
    training.run(tiny(cache_dir, str(tmp_path / "xla"), xla="true"))
    plain, xla = losses_of(str(tmp_path / "plain")), losses_of(str(tmp_path / "xla"))
    np.testing.assert_allclose([xla[s] for s in (1, 2, 3)], [plain[s] for s in (1, 2, 3)],
                               rtol=1e-4)


@pytest.mark.setting("precision")
def test_bfloat16_computes_in_bfloat16_and_learns(tiny_cache, tmp_path):
    import keras

    _, cache_dir = tiny_cache
    runs = {p: str(tmp_path / p) for p in ("mixed_bfloat16", "float32")}
    try:
        for precision, model_dir in runs.items():
            training.run(tiny(cache_dir, model_dir, precision=precision, steps_per_epoch=12))
            # The run's precision is its own: an export built next in this process (as in
            # tests/test_matrix.py) must not silently compute in bfloat16.
            assert keras.mixed_precision.global_policy().name == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    bf16, f32 = losses_of(runs["mixed_bfloat16"]), losses_of(runs["float32"])
    assert bf16[12] < 0.8 * bf16[1], "bfloat16 training did not learn"
    # Same data and initial weights: the same losses up to bfloat16's 8-bit mantissa, so the
    # step did compute in bfloat16 (float32 would give identical losses).
    assert [bf16[s] for s in (1, 2, 3)] != [f32[s] for s in (1, 2, 3)]
    np.testing.assert_allclose([bf16[s] for s in (1, 2, 3)], [f32[s] for s in (1, 2, 3)],
                               rtol=0.05)
    assert all(w.dtype == np.float32 and np.isfinite(w).all()
               for w in weights_of(runs["mixed_bfloat16"])), "weights stay float32"


def reference_sums(targets: np.ndarray, logits: np.ndarray, eps: float):
    """`masked_sums` by hand (float64): (loss sum, count, correct, d loss sum / d logits), the
    smoothed target being 1 - eps on the true token plus eps / allowed on each allowed id;
    a banned target (padding, or [UNK]: a word outside the vocabulary) counts for nothing."""
    from dist_caption.data.text import BANNED_IDS

    vocab = logits.shape[-1]
    allowed = np.ones(vocab, bool)
    allowed[list(BANNED_IDS)] = False
    loss, count, correct = 0.0, 0, 0
    grad = np.zeros(logits.shape, np.float64)
    for index in np.ndindex(targets.shape):
        target, row = targets[index], logits[index].astype(np.float64)
        if target in BANNED_IDS:  # padding, or a word the model can never produce
            continue
        q = np.where(allowed, eps / allowed.sum(), 0.0)
        q[target] += 1 - eps
        p = np.exp(row - row.max())
        p /= p.sum()
        loss -= (q[allowed] * np.log(p[allowed])).sum()
        count += 1
        correct += int(row.argmax() == target)
        grad[index] = p - q
    return loss, count, correct, grad


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_masked_sums_smooths_over_the_allowed_ids_only(eps, dtype):
    from dist_caption.data.text import BANNED_IDS

    rng = np.random.default_rng(0)
    # 5 tokens, an [UNK] (an out-of-vocabulary word: 1e9 of loss if it counted), 2 padding
    targets = np.array([[4, 6, 3, 0], [5, 1, 3, 0]], np.int32)
    logits = 2 * rng.standard_normal((2, 4, 7)).astype(np.float32)
    logits[0, 0, 4] = logits[1, 0, 5] = logits[1, 2, 3] = 6.0  # 3 of the 5 predicted right
    logits[..., list(BANNED_IDS)] = -1e9  # as the model pins them (-inf in float16)
    logits = tf.cast(logits, dtype)  # what the reference sees too
    want_loss, want_count, want_correct, want_grad = reference_sums(
        targets, tf.cast(logits, tf.float32).numpy(), eps)
    assert (want_count, want_correct) == (5, 3)

    def sums(logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss, count, correct = training.masked_sums(tf.constant(targets), logits, eps)
        return loss, count, correct, tape.gradient(loss, logits)

    for compiled in (sums, tf.function(sums, jit_compile=True)):  # the --xla train step
        loss, count, correct, grad = compiled(logits)
        assert loss.dtype == tf.float32
        np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-5)
        assert (count.numpy(), correct.numpy()) == (want_count, want_correct)
        # The banned columns get no gradient: nothing asks for probability they cannot have.
        np.testing.assert_allclose(tf.cast(grad, tf.float32).numpy(), want_grad, atol=2e-3)
        assert not tf.cast(grad, tf.float32).numpy()[..., list(BANNED_IDS)].any()


@pytest.fixture(scope="module")
def unsmoothed_run(tiny_cache, tmp_path_factory):
    """24 steps without label smoothing: (the final metrics, the logged train/loss)."""
    model_dir = str(tmp_path_factory.mktemp("unsmoothed") / "run")
    metrics = training.run(tiny(tiny_cache[1], model_dir, steps_per_epoch=24))
    return metrics, losses_of(model_dir)


@pytest.mark.parametrize("xla", ["false", "true"])
def test_label_smoothing_logs_a_per_token_loss_and_learns_like_without(tiny_cache, tmp_path,
                                                                       unsmoothed_run, xla):
    plain_metrics, plain_losses = unsmoothed_run
    model_dir = str(tmp_path / "smoothed")
    metrics = training.run(tiny(tiny_cache[1], model_dir, steps_per_epoch=24,
                             label_smoothing=0.1, xla=xla))
    losses = losses_of(model_dir)
    assert sorted(losses) == list(range(1, 25))
    # A per-token cross-entropy over the 38 allowed ids (log 38 = 3.6), falling; at step 1
    # (the same initial weights) within half a unit of the unsmoothed run's 3.5, not ~7e6.
    assert all(0 < loss < 6 for loss in losses.values()), losses
    assert abs(losses[1] - plain_losses[1]) < 0.5, (losses[1], plain_losses[1])
    assert losses[24] < 0.85 * losses[1]
    # val_loss is evaluated without smoothing: within 0.05 of the unsmoothed run's (2.68
    # here) and well below the untrained loss (3.5: step 1's, before any update).
    untrained = plain_losses[1]
    assert plain_metrics["val_loss"] < 0.85 * untrained
    assert metrics["val_loss"] < 0.85 * untrained
    assert abs(metrics["val_loss"] - plain_metrics["val_loss"]) < 0.05, (
        metrics["val_loss"], plain_metrics["val_loss"])


def _train_cli(cache_dir: str, model_dir: str, *extra: str) -> subprocess.CompletedProcess:
    result = run_module("dist_caption.train", f"--cache_dir={cache_dir}",
                        f"--model_dir={model_dir}", *TINY_FLAGS, *extra, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_same_weights_with_one_replica_two_mirrored_replicas_and_two_workers(tiny_cache,
                                                                              tmp_path):
    """Same global batch, same examples: the summed-gradient step makes the replica count
    invisible to the weights (up to float summation order), and to their moving average
    (`--ema_decay`, SyncOnRead copies updated on every replica); XLA-compiled steps throughout."""
    _, cache_dir = tiny_cache
    one, mirrored, workers = (str(tmp_path / n) for n in ("one", "mirrored", "workers"))
    _train_cli(cache_dir, one, "--strategy=default", "--xla=true", "--ema_decay=0.5")
    _train_cli(cache_dir, mirrored, "--strategy=mirrored", "--cpu_devices=2", "--xla=true",
               "--ema_decay=0.5")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    launched = subprocess.run(
        ["bash", "launch/train.sh", "--workers", "2", "--startup_timeout", "120",
         f"--cache_dir={cache_dir}", f"--model_dir={workers}", *TINY_FLAGS, "--xla=true",
         "--ema_decay=0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TMPDIR": str(scratch)})
    assert launched.returncode == 0, launched.stdout[-3000:]
    assert not glob.glob(str(scratch / "dist_caption_ckpt_*")), "scratch checkpoint left"
    # The loss and the global norm of the summed gradient scale with how the batch is
    # averaged, so they catch a per-replica mean; Adam's update barely would.
    for tag in ("train/loss", "train/grad_norm"):
        want = losses_of(one, tag)
        assert sorted(want) == [1, 2, 3]
        for other in (mirrored, workers):
            got = losses_of(other, tag)
            np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-3,
                                       err_msg=f"{tag} of {other}")
    # Weights move by ~1e-2 in these steps; Adam amplifies summation-order noise in tiny
    # gradients to ~2e-5, hence the tolerance.
    # weights_of restores the averaged weights of a run that kept them; raw_weights_of its own.
    reference, raw_reference = weights_of(one), raw_weights_of(one)
    assert max(np.abs(a - r).max() for a, r in zip(reference, raw_reference)) > 1e-3
    for other in (mirrored, workers):
        for i, (got, want) in enumerate(zip(weights_of(other), reference)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"average {i}")
        for i, (got, want) in enumerate(zip(raw_weights_of(other), raw_reference)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"weight {i}")


OVERFLOW_SCRIPT = r"""
import json, sys
import numpy as np
from dist_caption import training
import keras, tensorflow as tf

strategy = training.make_strategy("mirrored", cpu_devices=2)
keras.mixed_precision.set_global_policy("mixed_float16")
from dist_caption.data import pipeline
cache_dir = sys.argv[1]
manifest = pipeline.load_manifest(cache_dir)
cfg = training.TrainConfig(cache_dir=cache_dir, model_dir="unused", units=16, num_layers=1,
                        max_len=24, global_batch_size=20, dropout=0.0, warmup_steps=0)
model, optimizer = training.build_model_and_optimizer(strategy, cfg, manifest, total_steps=10)
stepper = training.Stepper(strategy, model, optimizer, cfg, "mixed_float16", xla=False)
good = next(iter(pipeline.caption_dataset(cache_dir, "train", 10, 24, shuffle=False)))
bad = dict(good, features=tf.fill(tf.shape(good["features"]), tf.constant(np.inf, tf.float16)))

def batches(poison):
    # one global batch of 20, split in order: replica 0 gets `good`, replica 1 the other half
    ds = tf.data.Dataset.from_tensors(good)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(bad if poison else good))
    return iter(strategy.experimental_distribute_dataset(ds.unbatch().batch(20)))

before = [v.numpy().copy() for v in model.trainable_variables]
scale0 = float(stepper.loss_scale.numpy())
out = stepper.train_step(batches(poison=True), tf.constant(0.0))
after = [v.numpy() for v in model.trainable_variables]
report = {"applied": bool(out["applied"]), "scale0": scale0,
          "scale1": float(stepper.loss_scale.numpy()),
          "unchanged": all(np.array_equal(a, b) for a, b in zip(before, after)),
          "iterations": int(optimizer.iterations.numpy())}
out = stepper.train_step(batches(poison=False), tf.constant(0.0))
report["applied_next"] = bool(out["applied"])
report["finite"] = all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
report["changed"] = not all(np.array_equal(a, v.numpy())
                            for a, v in zip(after, model.trainable_variables))
per_replica = [[v.numpy() for v in var.value.values] for var in model.trainable_variables[:3]]
report["replicas_agree"] = all(np.array_equal(p[0], p[1]) for p in per_replica)
print(json.dumps(report))
"""


@pytest.mark.slow
def test_float16_overflow_on_one_replica_skips_the_step_on_every_replica(tiny_cache):
    _, cache_dir = tiny_cache
    result = subprocess.run([sys.executable, "-c", OVERFLOW_SCRIPT, cache_dir], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["applied"] is False and report["unchanged"]
    assert report["iterations"] == 0
    assert report["scale1"] == report["scale0"] / 2
    assert report["applied_next"] and report["changed"] and report["finite"]
    assert report["replicas_agree"]


@pytest.mark.slow
def test_sigterm_checkpoints_every_worker_and_the_rerun_finishes(tiny_cache, tmp_path):
    _, cache_dir = tiny_cache
    model_dir = str(tmp_path / "run")
    steps = ["--steps_per_epoch=600", "--epochs=1"]
    proc = subprocess.Popen(
        ["bash", "launch/train.sh", "--workers", "2", f"--cache_dir={cache_dir}",
         f"--model_dir={model_dir}", *TINY_FLAGS, *steps],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    for line in proc.stdout:  # the chief's start-up line: all workers have joined
        if "2 worker(s), 2 replica(s)" in line or time.time() > deadline:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == training.PREEMPTED, rest[-3000:]
    for worker in ("[w0]", "[w1]"):
        assert any(l.startswith(worker) and "SIGTERM: checkpointed step" in l
                   for l in rest.splitlines()), rest[-3000:]
    saved = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    step = int(saved.rsplit("-", 1)[1])
    assert 0 < step < 600
    assert tf.train.load_checkpoint(saved).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == step

    again = subprocess.run(  # the rerun: every worker resumes from the chief's checkpoint
        ["bash", "launch/train.sh", "--workers", "2", f"--cache_dir={cache_dir}",
         f"--model_dir={model_dir}", *TINY_FLAGS, *steps],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resumed from {saved} at step {step}" in again.stdout
    logged = [e.step for p in glob.glob(os.path.join(model_dir, "logs", "events.*"))
              for e in tf.compat.v1.train.summary_iterator(p)
              if any(v.tag == "train/loss" for v in e.summary.value)]
    assert sorted(logged) == list(range(1, 601)), "a step was repeated or skipped"


@pytest.mark.setting("cpu_devices", "global_batch_size", "captions_per_image", "train:cache_dir")
def test_bad_training_flags_are_one_line_errors(tiny_cache, tmp_path):
    _, cache_dir = tiny_cache
    cases = [
        (["--units=30", "--num_heads=4"], "--num_heads must divide --units"),
        (["--global_batch_size=0"], "--global_batch_size must be a positive number"),
        (["--decoder=lstm"], "decoder"),
        (["--cache_dir=/nonexistent/cache"], "no feature cache at /nonexistent/cache"),
        ([f"--cache_dir={cache_dir}", "--strategy=mirrored", "--cpu_devices=2",
          "--global_batch_size=21", "--epochs=1"], "use a multiple of 2"),
        ([f"--cache_dir={cache_dir}", "--captions_per_image=3", "--epochs=1"],
         "--captions_per_image 3 does not divide the 64 captions"),
        # Rules across flags are checked as they are parsed: before the missing cache is seen.
        (["--cache_dir=/nonexistent/cache", "--objective=scst"], "pass --init_from RUN_DIR"),
        (["--cache_dir=/nonexistent/cache", "--objective=scst", "--init_from=/nonexistent/run",
          "--scst_samples=1"], "--scst_baseline mean needs --scst_samples of at least 2"),
    ]
    assert_training_errors(cases, tmp_path)


@pytest.mark.setting("evaluate:model_dir", "evaluate:out")
def test_show_attend_tell_decoder_trains_and_evaluates_from_the_cli(tiny_cache, tmp_path):
    _, cache_dir = tiny_cache
    model_dir = str(tmp_path / "gru")
    training.run(tiny(cache_dir, model_dir, decoder="gru_attention", steps_per_epoch=4))
    losses = losses_of(model_dir)
    assert losses[4] < losses[1]
    result = run_module("dist_caption.evaluate", f"--model_dir={model_dir}", "--split=test",
                        "--checkpoint=latest")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(open(os.path.join(model_dir, "eval-test.json")).read())
    assert report["images"] == 4 and set(report["captions"]) == {"37", "38", "39", "40"}
    # The scores are those of the captions the file lists, against their references...
    from dist_caption import evaluation
    from dist_caption.data import pipeline

    predictions = {k: v["prediction"] for k, v in report["captions"].items()}
    references = {k: v["references"] for k, v in report["captions"].items()}
    assert report["metrics"] == pytest.approx(
        evaluation.score(predictions, references, pipeline.load_manifest(cache_dir)))
    # ... and those captions are the model's greedy captions of the cached test features.
    model, run = run_dir.restore(model_dir, "latest")
    assert predictions == evaluation.caption_split(model, cache_dir, "test",
                                                 run["model"]["max_len"])[0]
    assert f"test (4 images): BLEU-1 {report['metrics']['BLEU-1']:.3f}" in result.stdout
    # An export's model card carries the metrics, and the checkpoint they were computed on.
    from dist_caption import exporting

    checkpoint = run_dir.checkpoint_path(model_dir, "latest")
    assert report["checkpoint"] == checkpoint
    card = exporting.model_card(model_dir, run, pipeline.load_manifest(cache_dir), checkpoint,
                                model_name="caption", version=1, export_settings={})
    assert card["metrics"]["test"]["metrics"] == report["metrics"]
    assert card["metrics"]["test"]["checkpoint"] == checkpoint
    assert card["checkpoint"] == {"path": checkpoint, "step": 4, "averaged_weights": False}
    # --beam 1 is greedy decoding; a wider beam is scored and recorded with its setting.
    beam = run_module("dist_caption.evaluate", f"--model_dir={model_dir}", "--split=test",
                      "--checkpoint=latest", "--beam=1", f"--out={tmp_path / 'beam1.json'}")
    assert beam.returncode == 0, beam.stderr[-2000:]
    beam1 = json.loads(open(tmp_path / "beam1.json").read())
    assert beam1["decoding"] == {"beam": 1, "length_penalty": 0.0, "no_repeat_ngram": 0}
    assert {k: v["prediction"] for k, v in beam1["captions"].items()} == predictions
    # Each wide caption is the best of the image's 3 beams by log_prob / length, ranked here
    # from the beams of a search without the penalty (it matters for this barely trained
    # model: its most probable beams are the shortest).
    from dist_caption.data import text
    from dist_caption.model import beam_search_decode

    wide = evaluation.caption_split(model, cache_dir, "test", run["model"]["max_len"], beam=3,
                                  length_penalty=1.0)[0]
    assert set(wide) == set(predictions)
    manifest = pipeline.load_manifest(cache_dir)
    vocab = text.Vocabulary.load(os.path.join(cache_dir, manifest["vocab_file"]))
    expected = {}
    for batch in pipeline.image_dataset(cache_dir, "test", 8):
        beams = {k: v.numpy() for k, v in beam_search_decode(
            model, batch["features"], run["model"]["max_len"], 3).items()}
        score = beams["log_prob"] / np.maximum(beams["length"], 1)
        for image_id, scores, tokens in zip(batch["image_id"].numpy(), score, beams["tokens"]):
            best = int(np.argmax(scores))  # the first of equals, as the stable sort keeps
            expected[image_id.decode()] = vocab.decode(tokens[best])
    assert wide == expected
