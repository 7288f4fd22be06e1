"""Running an entry point: flag errors and `UserError`s become one line and exit status 2."""

from __future__ import annotations

import os
import sys
from typing import Callable

# TensorFlow's C++ start-up chatter is noise for a command-line user; real errors still surface.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from dist_caption.errors import UserError  # noqa: E402


def fail(message: str) -> None:
    """Prints `error: message` on stderr and exits with status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (see --helpshort)")


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run` for our entry points, with one-line errors instead of tracebacks."""

    def guarded(argv: list[str]) -> None:
        if len(argv) > 1 and not getattr(main, "takes_positional", False):
            fail(f"unexpected argument {argv[1]!r}: every option is a --flag (see --helpshort)")
        try:
            main(argv)
        except UserError as e:
            fail(str(e))

    app.run(guarded, flags_parser=_parse_flags)
