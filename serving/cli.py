"""Running a command-line entry point: one `error:` line and an exit status, no traceback.

Shared by `serving.client`, `serving.local_server` and `dist_caption`'s entry points.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

from absl import app, flags

USAGE = 2


class CommandError(Exception):
    """A failure the user can act on, printed as one line; exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def read_file(path: str, what: str, error: type[CommandError] = CommandError) -> bytes:
    """The bytes of `path`, or `error` naming `what` it is, the path and the reason."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None


def fail(message: str, status: int = USAGE) -> NoReturn:
    """Prints `error: message` on stderr and exits with `status`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (see --helpshort)")


def run(main: Callable[[list[str]], None], errors: tuple[type[Exception], ...] = (),
        takes_positional: bool = False) -> None:
    """`absl.app.run(main)`: a flag error, a `CommandError` or one of `errors` is one line
    (status: the error's `exit_code`, else 2); positional arguments are refused unless
    `takes_positional`."""

    def guarded(argv: list[str]) -> None:
        if len(argv) > 1 and not takes_positional:
            fail(f"unexpected argument {argv[1]!r}: every option is a --flag (see --helpshort)")
        try:
            main(argv)
        except (CommandError, *errors) as e:
            fail(str(e), getattr(e, "exit_code", USAGE))

    app.run(guarded, flags_parser=_parse_flags)
