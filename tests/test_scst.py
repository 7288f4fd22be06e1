"""Self-critical training: it raises the reward, resumes exactly, is replica-count invariant,
and refuses a bad --init_from in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import (ROOT, TINY_FLAGS, assert_training_errors, losses_of, run_module, tiny,
                      weights_of)
from dist_caption import run_dir, training

# Its module fixtures are expensive: one xdist worker runs all its tests (launch/test.sh).
pytestmark = pytest.mark.xdist_group("scst")

# 4 images x 5 samples per step, as the cross-entropy tests take 20 captions.
SCST = dict(objective="scst", scst_samples=5, global_batch_size=4, warmup_steps=0,
            learning_rate=1e-3)


def scst(cache_dir: str, model_dir: str, init: str, **overrides) -> training.TrainConfig:
    return tiny(cache_dir, model_dir, init_from=init, **{**SCST, **overrides})


@pytest.fixture(scope="module")
def ce_run(tiny_cache, tmp_path_factory):
    """A cross-entropy run (width 64, 30 steps) that captions a little: its model_dir."""
    model_dir = str(tmp_path_factory.mktemp("ce") / "run")
    training.run(tiny(tiny_cache[1], model_dir, steps_per_epoch=30, units=64))
    return model_dir


@pytest.mark.setting("objective")
def test_scst_raises_the_mean_training_reward(tiny_cache, ce_run, tmp_path):
    cache_dir, init = tiny_cache[1], ce_run
    model_dir = str(tmp_path / "scst")
    # 8 images a step in a fixed order: the 32 training images every 4 steps.
    training.run(scst(cache_dir, model_dir, init, steps_per_epoch=64, learning_rate=3e-3,
                   units=64, global_batch_size=8))
    reward = losses_of(model_dir, "train/reward")
    assert sorted(reward) == list(range(1, 65))
    first, last = (np.mean([reward[s] for s in steps])
                   for steps in (range(1, 9), range(57, 65)))  # the same images twice
    assert last > first + 0.15, (first, last)  # measured: 0.46 -> 0.75
    assert os.path.isfile(run_dir.cider_df_file(model_dir))
    run = run_dir.load(model_dir)
    assert run["train"]["objective"] == "scst" and run["train"]["init_from"] == init


@pytest.mark.setting("init_from")
def test_scst_starts_from_the_init_runs_best_weights(tiny_run, tmp_path):
    _, cache_dir, init = tiny_run
    model_dir = str(tmp_path / "zero")
    training.run(scst(cache_dir, model_dir, init, steps_per_epoch=1, learning_rate=1e-12))
    best, _ = run_dir.restore(init, "best")
    for got, want in zip(weights_of(model_dir), (w.numpy() for w in best.weights)):
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_resumed_scst_run_repeats_the_uninterrupted_losses(tiny_run, tmp_path, baseline):
    _, cache_dir, init = tiny_run
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    settings = dict(epochs=2, steps_per_epoch=3, shuffle=True, scst_baseline=baseline)
    training.run(scst(cache_dir, whole, init, **settings))
    training.run(scst(cache_dir, parts, init, max_steps=4, **settings))  # stops mid-epoch 2
    assert max(losses_of(parts)) == 4
    training.run(scst(cache_dir, parts, init, **settings))
    for tag in ("train/loss", "train/reward"):
        a, b = losses_of(whole, tag), losses_of(parts, tag)
        assert sorted(a) == sorted(b) == list(range(1, 7))
        np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)],
                                   rtol=1e-5, atol=1e-7, err_msg=tag)
    for a, b in zip(weights_of(whole), weights_of(parts)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


SCST_FLAGS = [f"--{k}={v}" for k, v in SCST.items()]


@pytest.mark.slow
def test_one_replica_and_two_workers_take_the_same_scst_update(tiny_run, tmp_path):
    """The samples are seeded per image, the gradients and token counts summed in one
    all-reduce: 1 replica and 2 workers see the same rewards, loss and gradient norm. The
    batch flags stay at their defaults (64 images, 5 samples each), which must split over
    both; the console shows the reward."""
    _, cache_dir, init = tiny_run
    one, workers = str(tmp_path / "one"), str(tmp_path / "workers")
    batch_flags = ("--global_batch_size=", "--scst_samples=", "--scst_baseline=")
    common = [f"--cache_dir={cache_dir}", f"--init_from={init}",
              *(f for f in TINY_FLAGS + SCST_FLAGS if not f.startswith(batch_flags))]
    single = run_module("dist_caption.train", f"--model_dir={one}", "--strategy=default",
                        *common, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = subprocess.run(
        ["bash", "launch/train.sh", "--workers", "2", "--startup_timeout", "120",
         f"--model_dir={workers}", *common],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:]
    assert re.search(r"reward \d\.\d{3} loss -?\d", launched.stdout), launched.stdout[-3000:]
    for tag in ("train/reward", "train/loss", "train/grad_norm"):
        want, got = losses_of(one, tag), losses_of(workers, tag)
        assert sorted(want) == sorted(got) == [1, 2, 3]
        np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-3,
                                   atol=1e-6, err_msg=tag)
    for i, (got, want) in enumerate(zip(weights_of(workers), weights_of(one))):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"weight {i}")


def test_bad_init_from_is_a_one_line_error(tiny_run, tmp_path):
    _, cache_dir, init = tiny_run
    other_vocab = str(tmp_path / "other_vocab")
    shutil.copytree(init, other_vocab)
    path = os.path.join(other_vocab, run_dir.RUN_FILE)
    run = json.load(open(path))
    json.dump({**run, "vocab_sha256": "0" * 64}, open(path, "w"))
    common = [f"--cache_dir={cache_dir}", *TINY_FLAGS, *SCST_FLAGS]
    cases = [
        ([f"--init_from={tmp_path / 'missing'}"], "does not exist"),
        ([f"--init_from={other_vocab}"], "another vocabulary"),
        ([f"--init_from={init}", "--units=32"], "--units=32 (it has 16)"),
        ([f"--init_from={init}", "--scst_samples=1"], "needs --scst_samples of at least 2"),
        (["--init_from="], "pass --init_from"),
    ]
    assert_training_errors([(common + args, needle) for args, needle in cases], tmp_path)
