"""Publishing an export version (serving.publish, launch/publish_model.sh): a watcher polling
the destination never sees an incomplete version, on a local folder, on an object store
(tf.io.gfile's ram:// filesystem) and through kubectl into the tools pod (a fake kubectl that
runs the pod's commands on a local folder); bad sources and existing versions are refused in
one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

from conftest import ROOT, assert_one_line_error, run_module
from serving import publish

SLOW = 0.02  # seconds per copied file: a window wide enough for the watcher to look into


def files_of(folder: str) -> dict[str, int]:
    """Relative path -> size of every file under a local folder."""
    return {os.path.relpath(os.path.join(p, n), folder): os.path.getsize(os.path.join(p, n))
            for p, _, names in os.walk(folder) for n in names}


class Watcher(threading.Thread):
    """Polls `base` as a server does and records every integer version that it finds
    incomplete (`complete(path)` is False) until stopped."""

    def __init__(self, base: str, complete, listdir=os.listdir):
        super().__init__(daemon=True)
        self.base, self.complete, self.listdir = base, complete, listdir
        self.incomplete, self.seen = [], set()
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while True:
            last = self.stop.is_set()  # one more look after being stopped
            try:
                names = self.listdir(self.base)
            except (OSError, tf.errors.NotFoundError):
                names = []
            for name in names:
                name = name.rstrip("/")
                if name.isdigit():
                    self.seen.add(name)
                    if not self.complete(os.path.join(self.base, name)):
                        self.incomplete.append(name)
            if last:
                return
            time.sleep(0.001)

    def finish(self) -> "Watcher":
        self.stop.set()
        self.join()
        return self


@pytest.fixture
def slow_copy(monkeypatch):
    real = publish.copy_file

    def copy(source: str, target: str) -> None:
        time.sleep(SLOW)
        real(source, target)

    monkeypatch.setattr(publish, "copy_file", copy)


def test_a_local_publish_is_never_seen_half_written(tiny_export, tmp_path, slow_copy):
    want = files_of(tiny_export)
    dest = str(tmp_path / "models" / "caption")
    watcher = Watcher(dest, lambda path: files_of(path) == want)
    final = publish.publish(tiny_export, dest, version=1)
    watcher.finish()
    assert final == os.path.join(dest, "1") and files_of(final) == want
    assert watcher.seen == {"1"} and not watcher.incomplete
    assert os.listdir(dest) == ["1"]  # no temporary folder left
    # The same watcher does catch a plain copy into the version folder.
    naive = Watcher(dest, lambda path: files_of(path) == want)
    shutil.copytree(tiny_export, os.path.join(dest, "2"),
                    copy_function=lambda s, d: (time.sleep(SLOW), shutil.copy2(s, d)))
    assert "2" in naive.finish().incomplete


def test_an_object_store_publish_writes_saved_model_pb_last(tiny_export, slow_copy):
    want = files_of(tiny_export)
    dest = "ram://bucket/exports/caption"

    def complete(path: str) -> bool:
        # On an object store the prefix exists while it is copied; what a server relies on is
        # that once saved_model.pb is there, every other file is there, whole. (An object is
        # visible only once uploaded whole; ram:// shows saved_model.pb while it is written,
        # so its own length is not what is checked here: seen once under load.)
        if not tf.io.gfile.exists(f"{path}/saved_model.pb"):
            return True
        return all(tf.io.gfile.exists(f"{path}/{rel}") and
                   tf.io.gfile.stat(f"{path}/{rel}").length == size
                   for rel, size in want.items() if rel != "saved_model.pb")

    watcher = Watcher(dest, complete, tf.io.gfile.listdir)
    final = publish.publish(tiny_export, dest, version=3, check=False)
    watcher.finish()
    assert final == f"{dest}/3" and watcher.seen == {"3"} and not watcher.incomplete
    for rel, size in want.items():
        assert tf.io.gfile.stat(f"{final}/{rel}").length == size
    assert [n.rstrip("/") for n in tf.io.gfile.listdir(dest)] == ["3"]  # staging deleted
    with pytest.raises(publish.PublishError, match="already exists: versions are never"):
        publish.publish(tiny_export, dest, version=3, check=False)


FAKE_KUBECTL = """#!{python}
# kubectl for tests: `exec POD -- cmd` runs cmd here with the pod's absolute paths under
# $FAKE_POD_ROOT; `cp SRC NS/POD:PATH` copies the folder there, file by file, slowly.
import json, os, shutil, subprocess, sys, time
root, args = os.environ["FAKE_POD_ROOT"], sys.argv[1:]
with open(os.environ["FAKE_KUBECTL_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
namespace, command, pod = args[1], args[2], args[3]
if command == "exec":
    cmd = [root + a if a.startswith("/") else a for a in args[args.index("--") + 1:]]
    sys.exit(subprocess.run(cmd).returncode)
if command == "cp":
    target = args[4].split(":", 1)[1]
    shutil.copytree(args[3], root + target,
                    copy_function=lambda s, d: (time.sleep({slow}), shutil.copy2(s, d)))
"""


def test_kubectl_publish_copies_to_a_temporary_folder_then_renames(tiny_export, tmp_path):
    fake = tmp_path / "kubectl"
    fake.write_text(FAKE_KUBECTL.format(python=sys.executable, slow=SLOW))
    fake.chmod(0o755)
    root, log = tmp_path / "pod", tmp_path / "kubectl.log"
    (root / "models").mkdir(parents=True)
    os.environ.update(FAKE_POD_ROOT=str(root), FAKE_KUBECTL_LOG=str(log))
    want = files_of(tiny_export)
    watcher = Watcher(str(root / "models" / "caption"), lambda path: files_of(path) == want)
    try:
        final = publish.publish(tiny_export, "/models/caption", version=4, check=False,
                                kubectl=dict(pod="caption-model-publisher",
                                             namespace="dist-caption", kubectl=str(fake)))
        watcher.finish()
        assert final == "/models/caption/4" and watcher.seen == {"4"} and not watcher.incomplete
        assert files_of(str(root / "models" / "caption" / "4")) == want
        assert os.listdir(root / "models" / "caption") == ["4"]
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        copy = next(c for c in calls if c[2] == "cp")
        staging = copy[4].split(":", 1)[1]
        assert copy[4].startswith("dist-caption/caption-model-publisher:/models/caption/")
        assert not os.path.basename(os.path.dirname(staging)).isdigit()  # ignored by servers
        assert calls[-1][-3:] == [staging, "/models/caption/4", os.path.dirname(staging)]
        with pytest.raises(publish.PublishError, match="already exists in pod "
                           "dist-caption/caption-model-publisher"):
            publish.publish(tiny_export, "/models/caption", version=4, check=False,
                            kubectl=dict(pod="caption-model-publisher",
                                         namespace="dist-caption", kubectl=str(fake)))
    finally:
        watcher.finish()
        for name in ("FAKE_POD_ROOT", "FAKE_KUBECTL_LOG"):
            os.environ.pop(name)


@pytest.mark.setting("publish:version", "skip_check")
def test_the_script_checks_the_export_then_refuses_bad_sources_in_one_line(tiny_export,
                                                                            tmp_path):
    dest = tmp_path / "caption"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "publish_model.sh"),
                           tiny_export, str(dest), "--version=2"], capture_output=True,
                          text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(f"as {dest / '2'}")
    assert files_of(str(dest / "2")) == files_of(tiny_export)

    again = run_module("serving.publish", tiny_export, str(dest), "--version=2")
    assert_one_line_error(again, f"{dest / '2'} already exists", "another --version")
    shutil.copytree(tiny_export, tmp_path / "latest")
    unnamed = run_module("serving.publish", str(tmp_path / "latest"), str(dest))
    assert_one_line_error(unnamed, "is not named by a version number", "--version N")
    empty = tmp_path / "7"
    empty.mkdir()
    assert_one_line_error(run_module("serving.publish", str(empty), str(dest)),
                          "is not an export version folder: it has no saved_model.pb")
    broken = tmp_path / "8"
    shutil.copytree(tiny_export, broken)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    refused = run_module("serving.publish", str(broken), str(dest))
    assert_one_line_error(refused, "fails to load as TensorFlow Serving loads it",
                          "--skip_check")
    assert not (dest / "8").exists()
    skipped = run_module("serving.publish", str(broken), str(dest), "--skip_check")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert (dest / "8" / "saved_model.pb").read_bytes() == b"not a SavedModel"
    # An export without its model card is refused, checked or not.
    from serving import contract, publish

    cardless = tmp_path / "9"
    shutil.copytree(tiny_export, cardless)
    (cardless / contract.MODEL_CARD_FILE).unlink()
    for check in (True, False):
        with pytest.raises(publish.PublishError, match=r"has no model card \(assets.extra/"
                           r"model_card.json: it has none\); re-export it"):
            publish.publish(str(cardless), str(dest), check=check)
    (cardless / contract.MODEL_CARD_FILE).write_text("{not json")
    with pytest.raises(publish.PublishError, match=r"model_card.json: it is unreadable"):
        publish.publish(str(cardless), str(dest), check=False)
    assert not (dest / "9").exists()


@pytest.mark.setting("kubectl", "publish:pod", "namespace", "kubectl_binary")
def test_the_script_publishes_through_the_kubectl_pod_and_namespace_it_is_given(tiny_export,
                                                                                 tmp_path):
    fake = tmp_path / "my-kubectl"
    fake.write_text(FAKE_KUBECTL.format(python=sys.executable, slow=0))
    fake.chmod(0o755)
    root, log = tmp_path / "pod", tmp_path / "kubectl.log"
    (root / "models").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "serving.publish", tiny_export, "/models/caption", "--version=5",
         "--skip_check", "--kubectl", "--pod=publisher-7", "--namespace=team-a",
         f"--kubectl_binary={fake}"], cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "FAKE_POD_ROOT": str(root), "FAKE_KUBECTL_LOG": str(log)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"published {tiny_export} as /models/caption/5"
    assert files_of(str(root / "models" / "caption" / "5")) == files_of(tiny_export)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls and all(c[:2] == ["--namespace", "team-a"] for c in calls)
    assert any(c[2] == "exec" and c[3] == "publisher-7" for c in calls)
    assert any(c[2] == "cp" and c[4].startswith("team-a/publisher-7:/models/caption/")
               for c in calls)
