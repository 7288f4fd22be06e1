"""The README and docs/ point at things that exist: relative links, the repository paths they
name, the files of the README's layout, and the files and modules its commands run."""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

from conftest import ROOT

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
TOP = ("dist_caption/", "serving/", "launch/", "tests/", "k8s/", "benchmarks/", "docs/",
       ".ci/")


def text(page: str) -> str:
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def code_blocks(page: str) -> list[list[str]]:
    """The lines of each fenced code block of `page`."""
    return [block.splitlines() for block in re.findall(r"^```[^\n]*\n(.*?)^```", text(page),
                                                       re.S | re.M)]


def exists(path: str) -> bool:
    return os.path.exists(os.path.join(ROOT, path))


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    base = os.path.dirname(page)
    for target in re.findall(r"\]\(([^)\s]+)\)", text(page)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(base, target.split("#")[0]))
        assert exists(path) and not path.startswith(".."), f"{page}: broken link {target}"


@pytest.mark.parametrize("page", PAGES)
def test_named_repository_paths_exist(page):
    """`dist_caption/progress.py`, `launch/gpu_check.sh`, `tests/test_faults.py::...`: every
    such path in backticks is in the repository (placeholders and globs aside)."""
    for quoted in re.findall(r"`([^`\n]+)`", text(page)):
        for token in quoted.split():
            path = re.split(r"::|:\d|[),;]", token.strip("([.,"))[0]
            if path.startswith(TOP) and not re.search(r"[<>*{}$]", path):
                assert exists(path), f"{page} names `{path}`, which does not exist"


def layout_paths(lines: list[str]) -> list[str]:
    """The files and folders a layout block lists, each as a path from the root: a name at
    an indentation is inside the folder above it with less indentation."""
    stack: list[tuple[int, str]] = []
    paths = []
    for line in lines:
        indent = len(line) - len(line.lstrip())
        first = re.split(r"\s{2,}", line.strip())[0]
        names = [n.strip() for n in first.split(",")]
        if not all(re.fullmatch(r"[\w.]+/|[\w.]+\.(py|sh|md|toml)", n) for n in names):
            continue  # a description's continuation line
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = "".join(folder for _, folder in stack)
        paths += [parent + n for n in names]
        if names[-1].endswith("/"):
            stack.append((indent, names[-1]))
    return paths


def test_the_readme_layout_lists_files_that_exist():
    layout = next(b for b in code_blocks("README.md") if b and b[0] == "dist_caption/")
    paths = layout_paths(layout)
    assert "dist_caption/data/cache.py" in paths and "serving/local_server/loading.py" in paths
    assert [p for p in paths if not exists(p)] == []


def commands(page: str) -> list[str]:
    """The shell commands of `page`'s code blocks, continuation lines joined, comments cut."""
    joined = []
    for block in code_blocks(page):
        for line in "\n".join(block).replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if re.match(r"(bash |python |\.venv/bin/python |launch/|kubectl )", line):
                joined += [c.strip() for c in line.split("&&")]
    return joined


def test_every_readme_command_runs_an_existing_file_or_module():
    checked = 0
    for command in commands("README.md"):
        words = command.split()
        if words[0] == "bash" or words[0].startswith("launch/"):
            script = words[1] if words[0] == "bash" else words[0]
            assert exists(script), f"README runs {script}, which does not exist"
        elif "-m" in words:
            module = words[words.index("-m") + 1]
            assert importlib.util.find_spec(module), f"README runs -m {module}: no such module"
        elif words[:2] == ["kubectl", "apply"]:
            assert exists(words[words.index("-k") + 1]), command
        checked += 1
    assert checked >= 8  # the two set-up commands and one per stage
