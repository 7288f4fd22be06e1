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
# behind launch/train.sh, `log_filter` the filter the scripts pipe their logs through.
COMMANDS = {"train", "evaluate", "export", "extract_features", "predict", "report",
            "make_synthetic", "launch", "log_filter"}


def _defining_main_or_reading_flags(top: str) -> set[str]:
    """The modules under `top` (paths relative to it, without .py) with a `main` or FLAGS."""
    import re

    found = set()
    for folder, _, names in os.walk(os.path.join(ROOT, top)):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    text = f.read()
                if re.search(r"^def main\(", text, re.M) or re.search(r"\bFLAGS\b", text):
                    found.add(os.path.relpath(os.path.join(folder, name[:-3]),
                                              os.path.join(ROOT, top)))
    return found


def test_only_the_commands_define_main_or_read_flags():
    """No library module has a `main` or reads absl's FLAGS."""
    assert _defining_main_or_reading_flags("dist_caption") == COMMANDS
    # serving/: each command is its package's __main__.py, beside the library it calls;
    # cli.py is the commands' shared runner (it parses their flags).
    assert _defining_main_or_reading_flags("serving") == {
        "client/__main__", "publish/__main__", "local_server/__main__", "local_server/wait",
        "cli"}


def _import_graph() -> dict[str, set[str]]:
    """{module: the modules of dist_caption and serving it imports, anywhere in its file (lazy
    imports too)}, a package standing for its __init__.py."""
    import ast

    modules = {}
    for top in ("dist_caption", "serving"):
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    modules[dotted.removesuffix(".__init__")] = path
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from package import module` imports the module; else the names' module
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                          else node.module for a in node.names}
        graph[module] = {m for m in found if m in modules and m != module}
    return graph


def _layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 1 imports nothing of the project, and a module sits one layer above
    the highest module it imports. A cycle has no layer: it fails, naming the cycle."""
    layer: dict[str, int] = {}

    def place(module: str, path: tuple[str, ...]) -> int:
        assert module not in path, "import cycle: " + " -> ".join(path + (module,))
        if module not in layer:
            layer[module] = 1 + max((place(m, path + (module,)) for m in graph[module]),
                                    default=0)
        return layer[module]

    for module in sorted(graph):
        place(module, ())
    return layer


def test_the_import_graph_has_no_cycle_no_command_imported_and_at_most_8_layers():
    """Between files: no cycle, and no module imports a command. Between the units the redesign
    counted (dist_caption's modules, its packages data/ and model/, and serving/): at most 8
    layers."""
    graph = _import_graph()
    commands = {f"dist_caption.{c}" for c in COMMANDS} | {
        f"serving.{c}.__main__" for c in ("client", "publish", "local_server")} | {
        "serving.local_server.wait"}
    assert commands <= set(graph)  # the list is not stale
    imported_commands = {(m, c) for m, found in graph.items() for c in found & commands}
    assert not imported_commands, sorted(imported_commands)
    _layers(graph)

    def unit(module: str) -> str:
        parts = module.split(".")
        return "serving" if parts[0] == "serving" else ".".join(parts[:2])

    units: dict[str, set[str]] = {}
    for module, found in graph.items():
        units.setdefault(unit(module), set()).update(unit(m) for m in found)
    units = {u: found - {u} for u, found in units.items()}
    layer = _layers(units)
    deepest = max(layer, key=layer.get)
    assert layer[deepest] <= 8, (deepest, layer[deepest], sorted(layer.items(), key=str))


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
def test_the_serving_commands_refuse_bad_settings_in_one_line(tmp_path):
    """The checks and rules serving/config.py declares, at parse time: exit 2, one line."""
    image = str(tmp_path / "x.jpg")
    cases = [
        ("serving.client", [image, "--timeout=0"], "--timeout must be positive"),
        ("serving.client", [image, "--beam=-1"], "--beam must not be negative"),
        ("serving.client", [image, "--version=0"], "--version must be a positive integer"),
        ("serving.publish", ["--version=-1", "a", "b"], "--version must not be negative"),
        ("serving.local_server", [], "pass --model_base_path (with --model_name) or "
         "--model_config_file, one of them"),
        ("serving.local_server", [f"--model_base_path={tmp_path}", f"--model_config_file={image}"],
         "--model_config_file, one of them"),
        ("serving.local_server", [f"--model_base_path={tmp_path}", "--version_labels=stable"],
         "--version_labels must be label=version,..."),
        ("serving.local_server", [f"--model_base_path={tmp_path}", "--num_versions=0"],
         "--num_versions must be at least 1"),
        ("serving.local_server", [f"--model_base_path={tmp_path}", "--port=-1"],
         "--port must not be negative"),
        ("serving.local_server", [f"--model_base_path={tmp_path}", "--threads=0"],
         "--threads must be at least 1"),
    ]
    for (module, args, needle), result in zip(cases, _run_all([(m, a) for m, a, _ in cases])):
        assert_one_line_error(result, needle)


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


def test_the_log_filter_keeps_every_line_in_the_log_and_shows_all_but_the_notices(tmp_path):
    """`... 2>&1 | python -m dist_caption.log_filter LOG` (the quickstart's steps): the log gets
    every line, the console all but TensorFlow's notices; a CUDA failure shows with --gpus."""
    cuda = "E0000 00:00:1.2 77 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR\n"
    notice = ("WARNING: All log messages before absl::InitializeLog() is called are written "
              "to STDERR\n")
    ours = "step 20: loss 3.1\n"
    lines = notice + cuda + ours
    for extra, shown in (([], ours), (["--gpus"], cuda + ours)):
        log = tmp_path / f"log{len(extra)}.txt"
        log.write_text("earlier\n")
        result = subprocess.run([sys.executable, "-m", "dist_caption.log_filter", str(log),
                                 *extra], input=lines, capture_output=True, text=True,
                                cwd=ROOT, timeout=60)
        assert (result.returncode, result.stdout, result.stderr) == (0, shown, "")
        assert log.read_text() == "earlier\n" + lines  # appended, nothing lost
    wrong = subprocess.run([sys.executable, "-m", "dist_caption.log_filter", str(log), "--gpu"],
                           input=lines, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert wrong.returncode == 2 and wrong.stderr == (
        "usage: ... | python -m dist_caption.log_filter LOG_FILE [--gpus]\n")
