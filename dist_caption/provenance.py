"""Which code made a run or an export: the git commit of this checkout and whether its tree was
dirty. Pure Python (git is asked in a subprocess); the answer is None, with the reason, where
the package is not running from a git checkout or git is missing."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()


def code_version() -> dict:
    """{"commit", "dirty"} of the checkout this package runs from; a tree with uncommitted
    changes to tracked files, or with untracked files git does not ignore, is dirty."""
    try:
        if os.path.realpath(_git("rev-parse", "--show-toplevel")) != os.path.realpath(ROOT):
            return {"commit": None, "dirty": None,
                    "why": f"{ROOT} is not the top of a git checkout (an installed package)"}
        return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain"))}
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "why": "git is not installed"}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None, "why": f"{ROOT} is not a git checkout"}
