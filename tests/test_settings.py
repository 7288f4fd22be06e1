"""Every declared setting has a test that fails if the setting is ignored.

The settings are read from their declarations: the model and training settings of
`config.py`, the absl flags each command's `define_*` group adds (data, extraction, training,
evaluation, export, prediction, report, the local server, the client, publishing) and the
launcher's argparse options. A test says which settings it would catch being ignored with
`@pytest.mark.setting("name", ...)` (or a module's `pytestmark`); `EXEMPT` lists, with the
reason, the few that no test can catch.

A name that two commands declare differently (`--beam` of evaluate, predict and the client) is
one setting per command, tagged `command:name` (`evaluate:beam`); a declaration shared by
several commands (the dataset flags of extract_features, train and report) is one setting.
"""

from __future__ import annotations

import ast
import functools
import glob
import json
import os
import subprocess
import sys

from conftest import ROOT

TESTS = os.path.join(ROOT, "tests")

# What no test can catch being ignored, and why. Keep it short.
EXEMPT = {
    "extract_batch_size": "images per backbone call: speed and memory only (not one of a "
                          "cache's settings: a re-run with another value reuses the cache)",
    "threads": "the local server's gRPC worker threads: concurrency only, visible as timing "
               "alone (on a shared 2-core machine, not reliably)",
    "num_batch_threads": "merged batches run at once: concurrency only, visible as timing "
                         "alone (on a shared 2-core machine, not reliably)",
}

# Run in a subprocess, so that this process's absl FLAGS stay untouched: each command's group
# of flags is defined, recorded and deleted before the next. Prints
# {command: {name: declaration}}, a declaration being what tells two flags of one name apart.
_COLLECT = r"""
import argparse, json
from absl import flags
from dist_caption import config, launch
from serving import declaring
from dist_caption import flags as dc_flags
from serving.client import __main__ as client
from serving.local_server import __main__ as local_server
from serving.publish import __main__ as publish

FLAGS = flags.FLAGS
# Defined on import (absl's own, TensorFlow's): not ours. One of ours defined on import would
# belong to no command; say so.
ours = [n for n in FLAGS if not FLAGS.find_module_defining_flag(n).startswith(
    ("absl.", "tensorflow."))]
assert not ours, f"flags defined on import, by no command: {ours}"
before = set(FLAGS)
# Every define_<command>_flags of dist_caption/flags.py (a new one is found by its name), and
# the serving commands' own.
groups = {name[len("define_"):-len("_flags")]: define for name, define in vars(dc_flags).items()
          if name.startswith("define_") and name.endswith("_flags")}
assert {"train", "extract", "evaluate", "export", "predict", "report"} <= set(groups), groups
groups.update(local_server=local_server.define_flags, client=client.define_flags,
              publish=publish.define_flags)
out = {}
for command, define in groups.items():
    define()
    added = sorted(set(FLAGS) - before)
    out[command] = {n: [type(FLAGS[n]).__name__, repr(FLAGS[n].default), FLAGS[n].help]
                    for n in added}
    for name in added:
        delattr(FLAGS, name)
for cls in (config.ModelSettings, config.TrainSettings):  # flags of train; also without one
    for field in declaring.settings(cls):
        out["train"].setdefault(field.name, ["config", repr(field.default),
                                             field.metadata["help"]])


class Parsed(Exception):
    pass


def capture(parser, *args, **kwargs):  # the launcher's parser, as parse_args builds it
    out["launch"] = {a.option_strings[0].lstrip("-"): ["argparse", repr(a.default), a.help]
                     for a in parser._actions
                     if a.option_strings and not isinstance(a, argparse._HelpAction)}
    raise Parsed


launch._Parser.parse_known_args = capture
try:
    launch.parse_args([])
except Parsed:
    pass
print(json.dumps(out))
"""


@functools.cache
def declarations() -> dict[str, dict[str, list]]:
    """command -> {setting name: its declaration}, from the commands' own definitions."""
    result = subprocess.run([sys.executable, "-c", _COLLECT], cwd=ROOT, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def setting_keys(groups: dict[str, dict[str, list]]) -> set[str]:
    """`name` for each setting, `command:name` where commands declare a name differently."""
    kinds: dict[str, set] = {}
    for settings in groups.values():
        for name, declaration in settings.items():
            kinds.setdefault(name, set()).add(json.dumps(declaration))
    return {name if len(kinds[name]) == 1 else f"{command}:{name}"
            for command, settings in groups.items() for name in settings}


def declared_settings() -> set[str]:
    return setting_keys(declarations())


def _setting_marks(node: ast.AST):
    """The `pytest.mark.setting(...)` calls in a decorator or a `pytestmark` value."""
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "pytest.mark.setting":
            yield call


def covered_settings(paths=None) -> tuple[dict[str, list[str]], list[str]]:
    """({setting: [tests tagged with it]}, [malformed tags]) over tests/*.py."""
    covered: dict[str, list[str]] = {}
    malformed = []
    for path in sorted(paths or glob.glob(os.path.join(TESTS, "*.py"))):
        module = os.path.basename(path)
        tree = ast.parse(open(path).read(), path)
        tagged = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                tagged += [(f"{module}::{node.name}", call) for decorator in node.decorator_list
                           for call in _setting_marks(decorator)]
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
                tagged += [(module, call) for call in _setting_marks(node.value)]
        for where, call in tagged:
            names = [a.value for a in call.args
                     if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if not call.args or call.keywords or len(names) != len(call.args):
                malformed.append(f"{where} line {call.lineno}: {ast.unparse(call)} (give the "
                                 "settings' names as string literals)")
            for name in names:
                covered.setdefault(name, []).append(where)
    return covered, malformed


def check(declared: set[str], covered: dict[str, list[str]], exempt: dict[str, str]
          ) -> list[str]:
    """What is wrong, one line each: a setting without a test, a tag or exemption naming no
    declared setting, a setting both tagged and exempt."""
    problems = [f"{name}: no test fails if it is ignored; tag one with "
                f"@pytest.mark.setting({name!r}) or add it to EXEMPT with the reason"
                for name in sorted(declared - set(covered) - set(exempt))]
    for name in sorted(set(covered) - declared):
        qualified = sorted(d for d in declared if d.endswith(f":{name}"))
        hint = (f": the commands declare it differently, tag one of {qualified}" if qualified
                else "")
        problems.append(f"{name}: tagged on {', '.join(covered[name])} but not a declared "
                        f"setting{hint}")
    problems += [f"{name}: in EXEMPT but not a declared setting"
                 for name in sorted(set(exempt) - declared)]
    problems += [f"{name}: in EXEMPT and tagged on {', '.join(covered[name])}: drop one"
                 for name in sorted(set(exempt) & set(covered))]
    problems += [f"{name}: EXEMPT needs a reason" for name, why in exempt.items() if not why]
    return problems


def test_every_declared_setting_has_a_test_that_fails_if_it_is_ignored():
    covered, malformed = covered_settings()
    problems = malformed + check(declared_settings(), covered, EXEMPT)
    assert not problems, "\n".join(problems)


def test_the_check_finds_an_untested_setting_a_stale_tag_and_a_stale_exemption(tmp_path):
    declared = declared_settings()
    covered = {name: ["test_x.py::test_z"] for name in declared - set(EXEMPT)}  # all tested
    assert not check(declared, covered, EXEMPT)
    assert len(declared) > 100 and {"dropout", "max_images", "evaluate:beam",
                                    "local_server:model_name", "workers"} <= declared
    assert not {"beam", "model_name", "seed"} & declared  # declared differently by commands
    untested = check(declared | {"brand_new_flag"}, covered, EXEMPT)
    assert untested == ["brand_new_flag: no test fails if it is ignored; tag one with "
                        "@pytest.mark.setting('brand_new_flag') or add it to EXEMPT with the "
                        "reason"]
    stale = check(declared, {**covered, "beam": ["test_x.py::test_y"]},
                  {**EXEMPT, "gone_flag": "was removed"})
    assert any(p.startswith("beam: tagged on test_x.py::test_y but not a declared setting: "
                            "the commands declare it differently, tag one of ['client:beam'")
               for p in stale), stale
    assert "gone_flag: in EXEMPT but not a declared setting" in stale
    example = tmp_path / "test_example.py"
    example.write_text("import pytest\n"
                       "pytestmark = [pytest.mark.slow, pytest.mark.setting('units')]\n"
                       "@pytest.mark.setting('dropout', 'label_smoothing')\n"
                       "def test_a(): pass\n"
                       "class TestB:\n"
                       "    @pytest.mark.setting(NAME)\n"
                       "    def test_c(self): pass\n")
    found, malformed = covered_settings([str(example)])
    assert found == {"units": ["test_example.py"], "dropout": ["test_example.py::test_a"],
                     "label_smoothing": ["test_example.py::test_a"]}
    assert malformed == ["test_example.py::test_c line 6: pytest.mark.setting(NAME) (give the "
                         "settings' names as string literals)"]
