"""A progress line with rates, for extraction and training logs.

Hand-written on purpose: multi-worker logs need one plain line per interval when the output is
a pipe. `keras.utils.Progbar` (already a dependency) takes every POSIX process for a terminal
(`"posix" in sys.modules`) and writes `\r`, backspaces and ANSI colour codes into the pipe
(`python -c "...Progbar(3, interval=0)..." | od -c` shows them); tqdm redraws its line with `\r`
on a pipe too. This writes `\r` only to a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Prints `label  done/total  rate unit/s` on one line (a terminal) or every few seconds.

    >>> bar = Progress("extract", total=3, unit="images", stream=sys.stdout, min_interval=1e9)
    >>> bar.update(3)
    >>> bar.close()  # doctest: +ELLIPSIS
    extract 3/3 ... images/s ...
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "it",
                 stream: TextIO | None = None, min_interval: float | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.min_interval = min_interval if min_interval is not None else (
            0.2 if self.tty else 10.0)
        self.done = 0
        self.start = self._last = time.perf_counter()
        self.extra = ""

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        total = f"/{self.total}" if self.total else ""
        return (f"{self.label} {self.done}{total} {self.done / elapsed:,.1f} {self.unit}/s "
                f"{elapsed:.0f}s{self.extra}")

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        self.extra = f" {extra}" if extra else self.extra
        now = time.perf_counter()
        if now - self._last >= self.min_interval:
            self._last = now
            self._write()

    def _write(self, end: str = "") -> None:
        if self.tty:
            self.stream.write(f"\r{self.line()}\033[K{end}")
        else:
            self.stream.write(f"{self.line()}\n")
        self.stream.flush()

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        self._write(end="\n")
