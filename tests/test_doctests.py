"""Every docstring example in the package runs and shows what it says (examples that need
files or a server are marked `+SKIP` where they stand)."""

from __future__ import annotations

import doctest
import importlib
import os

import pytest

from conftest import ROOT

MODULES = sorted(
    os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
    for package in ("dist_caption", "serving")
    for folder, _, names in os.walk(os.path.join(ROOT, package))
    for name in names
    if name.endswith(".py") and ">>>" in open(os.path.join(folder, name), encoding="utf-8").read())


def test_the_package_has_examples():
    assert "dist_caption.config" in MODULES and "dist_caption.model.captioner" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module),
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
