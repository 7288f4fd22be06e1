"""Running an entry point: flag errors and `UserError`s become one line and exit status 2."""

from __future__ import annotations

import os
from typing import Callable

from dist_caption import console
from dist_caption.errors import UserError
from serving import cli as _cli

fail = _cli.fail


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run` for our entry points, with one-line errors instead of tracebacks, and
    TensorFlow's start-up notices left out of a terminal (`console.quiet_stderr`; into a pipe
    or a file every line goes, for the launcher's and the scripts' log files)."""
    if os.isatty(2):
        console.quiet_stderr()
    _cli.run(main, (UserError,), getattr(main, "takes_positional", False))
