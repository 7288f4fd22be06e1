"""Running an entry point: flag errors and `UserError`s become one line and exit status 2."""

from __future__ import annotations

from typing import Callable

from dist_caption.errors import UserError
from serving import cli as _cli

fail = _cli.fail


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run` for our entry points, with one-line errors instead of tracebacks."""
    _cli.run(main, (UserError,), getattr(main, "takes_positional", False))
