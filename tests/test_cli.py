"""Entry points as a user runs them: one-line errors with exit status 2, and the happy path."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, assert_one_line_error, run_module


def _run_all(cases: list[tuple[str, list[str]]]) -> list[subprocess.CompletedProcess]:
    """Runs the commands concurrently (each pays TensorFlow's import once)."""
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for module, args in cases]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_bad_extraction_and_evaluation_flags(tmp_path):
    broken = tmp_path / "dataset_coco.json"
    broken.write_text('{"images": [\n  {"filename": "a.jpg",\n')
    cases = [
        (["--backbone=vgg99"], "vgg99"),
        (["--shard_size=-1"], "--shard_size must be a positive number"),
        (["--vocab_size=3"], "--vocab_size must be above 4"),
        (["--dataset=coco"], "--dataset=coco needs --captions_json"),
        (["--dataset=coco", "--captions_json=/nope/captions.json", f"--image_dir={tmp_path}"],
         "captions file /nope/captions.json does not exist"),
        (["--backbone=resnet50", "--weights=/nope/w.h5"], "--weights must be imagenet, none"),
        (["stray"], "unexpected argument 'stray'"),
        ([f"--dataset=karpathy", f"--karpathy_json={broken}", f"--image_dir={tmp_path}",
          f"--cache_dir={tmp_path / 'c'}"], "dataset_coco.json"),
    ]
    results = _run_all([("dist_caption.extract_features", args) for args, _ in cases]
                       + [("dist_caption.evaluate", ["--model_dir=/nope/run"])])
    for result, (_, needle) in zip(results, cases):
        assert_one_line_error(result, needle)
    assert_one_line_error(results[-1], "/nope/run")


def test_extract_features_end_to_end_and_idempotent(tmp_path):
    args = [f"--synthetic_dir={tmp_path / 'syn'}", "--num_images=30", "--image_size=64",
            f"--cache_dir={tmp_path / 'cache'}", "--shard_size=8"]
    first = run_module("dist_caption.extract_features", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "grid [8, 8, 432] float16" in first.stdout
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == 24
    assert manifest["source"]["synthetic_dir"] == str(tmp_path / "syn")
    shard = tmp_path / "cache" / "train-00000-of-00003.tfrecord"
    mtime = shard.stat().st_mtime_ns
    again = run_module("dist_caption.extract_features", *args)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert shard.stat().st_mtime_ns == mtime
    changed = run_module("dist_caption.extract_features", *args[:-1], "--shard_size=16")
    assert_one_line_error(changed, "shard_size was 8, now 16", "--overwrite")
