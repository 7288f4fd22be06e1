"""Entry points as a user runs them: one-line errors with exit status 2, and the happy path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error, run_module


# The thin commands: each parses its flags and calls the library. `launch` is the launcher
# behind launch/train.sh, `console` the log filter the scripts pipe through.
COMMANDS = {"train", "evaluate", "export", "extract_features", "predict", "report",
            "make_synthetic", "launch", "console"}


def test_only_the_commands_define_main_or_read_flags():
    """No library module has a `main` or reads absl's FLAGS (flags.py defines them)."""
    import re

    found = set()
    package = os.path.join(ROOT, "dist_caption")
    for folder, _, names in os.walk(package):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    text = f.read()
                if re.search(r"^def main\(", text, re.M) or re.search(r"\bFLAGS\b", text):
                    found.add(os.path.relpath(os.path.join(folder, name[:-3]), package))
    assert found - {"flags"} <= COMMANDS, sorted(found - {"flags"} - COMMANDS)
    assert COMMANDS <= found  # the list above is not stale


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


@pytest.mark.slow
def test_bad_extraction_and_evaluation_flags(tmp_path):
    broken = tmp_path / "dataset_coco.json"
    broken.write_text('{"images": [\n  {"filename": "a.jpg",\n')
    cases = [
        (["--backbone=vgg99"], "vgg99"),
        (["--shard_size=-1"], "--shard_size must be a positive number"),
        (["--vocab_size=3"], "--vocab_size must be above 4"),
        (["--dataset=coco"], "--dataset=coco needs --captions_json"),
        ([f"--image_dir={tmp_path}", "--dataset=conceptual"],
         "--dataset=conceptual needs --cc_train_tsv"),
        (["--max_images=-1"], "--max_images must not be negative"),
        (["--dataset=coco", "--captions_json=/nope/captions.json", f"--image_dir={tmp_path}"],
         "captions file /nope/captions.json does not exist"),
        (["--backbone=resnet50", "--weights=/nope/w.h5"], "--weights must be imagenet, none"),
        (["stray"], "unexpected argument 'stray'"),
        (["--dataset=karpathy", f"--karpathy_json={broken}", f"--image_dir={tmp_path}",
          f"--cache_dir={tmp_path / 'c'}"], "dataset_coco.json"),
    ]
    results = _run_all([("dist_caption.extract_features", args) for args, _ in cases]
                       + [("dist_caption.evaluate", ["--model_dir=/nope/run"])])
    for result, (_, needle) in zip(results, cases):
        assert_one_line_error(result, needle)
    assert_one_line_error(results[-1], "/nope/run")


@pytest.mark.setting("train:model_dir")
def test_output_paths_are_checked_before_any_work(tiny_run, tiny_export, tmp_path):
    """A folder that cannot be created, or a file in a folder that does not exist, is one line
    at once: not a traceback, and not after the work is done."""
    synthetic_dir, _, model_dir = tiny_run
    forbidden, missing = "/proc/forbidden/x", str(tmp_path / "no-such-folder" / "out.html")
    image = f"{synthetic_dir}/images/000000037.jpg"
    cases = [
        ("dist_caption.train", [f"--model_dir={forbidden}"], f"--model_dir {forbidden}"),
        ("dist_caption.extract_features", [f"--cache_dir={forbidden}"], f"--cache_dir {forbidden}"),
        ("dist_caption.data.synthetic", [f"--out_dir={forbidden}"], f"--out_dir {forbidden}"),
        ("dist_caption.export", [f"--model_dir={model_dir}", f"--export_base={forbidden}"],
         f"cannot write in {forbidden}"),
        ("dist_caption.evaluate", [f"--model_dir={model_dir}", f"--out={missing}"],
         f"--out {missing}: the folder"),
        ("dist_caption.report", [f"--synthetic_dir={synthetic_dir}",
                                 f"--saved_model={tiny_export}", f"--out={missing}"],
         f"--out {missing}: the folder"),
        ("dist_caption.predict", [image, f"--saved_model={tiny_export}",
                                  f"--attention_png={missing}"], f"--attention_png {missing}"),
    ]
    for result, (_, _, needle) in zip(_run_all([(m, a) for m, a, _ in cases]), cases):
        assert_one_line_error(result, needle)
    assert not (tmp_path / "no-such-folder").exists()


@pytest.mark.setting("synthetic_dir", "num_images", "extract:cache_dir", "shard_size")
@pytest.mark.slow
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


@pytest.mark.setting("dataset", "captions_json", "karpathy_json", "flickr8k_captions",
                     "cc_train_tsv", "cc_val_tsv", "cc_image_names", "image_dir", "max_images")
@pytest.mark.slow
def test_extract_features_reads_every_dataset_layout(tmp_path):
    """COCO, Karpathy, Flickr8k and Conceptual Captions files as published -> a cache each,
    through the CLI."""
    from conftest import write_image

    images = tmp_path / "images"
    images.mkdir()
    names = [f"{i:012d}.jpg" for i in range(6)]
    for i, name in enumerate(names):
        write_image(str(images / name), (24, 20), seed=i)
    captions = [f"A photo of thing number {i}." for i in range(6)]
    coco = {}
    for split, ids in (("train", range(4)), ("val", range(4, 6))):
        path = tmp_path / f"captions_{split}2017.json"
        path.write_text(json.dumps({
            "images": [{"id": i, "file_name": names[i]} for i in ids],
            "annotations": [{"id": 10 + i, "image_id": i, "caption": captions[i]} for i in ids]}))
        coco[split] = str(path)
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [
        {"cocoid": i, "filename": names[i], "split": ("train", "restval", "train", "train", "val",
                                                      "test")[i],
         "sentences": [{"raw": captions[i], "tokens": []}]} for i in range(6)]}))
    flickr = tmp_path / "captions.txt"
    flickr.write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, c in zip(names, captions)))
    rows = tmp_path / "rows"  # Conceptual Captions as img2dataset downloads it: by row
    tsvs = {}
    for split, ids in (("train", range(4)), ("val", range(4, 6))):
        tsvs[split] = tmp_path / f"{split}.tsv"
        tsvs[split].write_text("".join(f"{captions[i]}  \thttp://x/{i}.jpg\n" for i in ids))
        (rows / split / "00000").mkdir(parents=True)
        for row, i in enumerate(ids):
            shutil.copyfile(images / names[i], rows / split / "00000" / f"{row:09d}.jpg")
    cases = {
        "coco": ["--dataset=coco", f"--captions_json={coco['train']}",
                 f"--captions_json={coco['val']}"],
        "karpathy": ["--dataset=karpathy", f"--karpathy_json={karpathy}"],
        "flickr8k": ["--dataset=flickr8k", f"--flickr8k_captions={flickr}"],
        "conceptual": ["--dataset=conceptual", f"--cc_train_tsv={tsvs['train']}",
                       f"--cc_val_tsv={tsvs['val']}", "--cc_image_names=row",
                       "--max_images=3"],
    }
    results = _run_all([("dist_caption.extract_features",
                         [*args, f"--image_dir={rows if name == 'conceptual' else images}",
                          f"--cache_dir={tmp_path / name}"])
                        for name, args in cases.items()])
    for name, result in zip(cases, results):
        assert result.returncode == 0, result.stderr[-2000:]
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        counts = {s: v["images"] for s, v in manifest["splits"].items()}
        assert sum(counts.values()) == (5 if name == "conceptual" else 6), (name, counts)
        assert counts.get("train", 0) >= 1, (name, counts)
        assert manifest["dataset"] == name and manifest["feature_shape"] == [8, 8, 432]
    conceptual = json.loads((tmp_path / "conceptual" / "manifest.json").read_text())
    assert conceptual["splits"]["train"]["images"] == 3
    assert conceptual["load_report"]["over_max_images"] == {"train": 1}
    assert conceptual["source"] == {"max_images": 3, "min_caption_words": 0,
                                    "cc_image_names": "row"}
    karpathy_counts = json.loads((tmp_path / "karpathy" / "manifest.json").read_text())["splits"]
    assert {s: v["images"] for s, v in karpathy_counts.items()} == {"train": 4, "val": 1,
                                                                   "test": 1}


@pytest.mark.slow
def test_a_command_at_a_terminal_shows_its_own_lines_without_tensorflows_notices(tmp_path):
    """At a terminal, a command that loads TensorFlow shows its error line alone: TensorFlow's
    C++ start-up notices (which it prints into a pipe) are left out."""
    import pty

    command = [sys.executable, "-m", "dist_caption.train", f"--cache_dir={tmp_path / 'none'}",
               f"--model_dir={tmp_path / 'run'}"]
    piped = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    error = (f"error: no feature cache at {tmp_path / 'none'}: build it with python -m "
             "dist_caption.extract_features (launch/train.sh does it for you)")
    assert piped.returncode == 2 and piped.stderr.splitlines()[-1] == error
    assert len(piped.stderr.splitlines()) > 1  # the notices, kept for the log files
    main, child = pty.openpty()
    proc = subprocess.Popen(command, cwd=ROOT, stdin=child, stdout=child, stderr=child)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=120) == 2
    assert out.decode().splitlines() == [error]
