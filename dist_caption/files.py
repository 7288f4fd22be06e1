"""Writing files so that a reader never sees half of one, and checking output paths up front.

Every writer of the project goes through `atomic_path` (or the two helpers on top of it): the
data goes to a hidden temporary name in the same folder (`.<name>.tmp<pid>`, so no reader
globbing `*.tfrecord` picks it up), and is renamed into place only once complete; a failure
removes it. A process killed meanwhile leaves the hidden file behind for its next run to clear.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator

from dist_caption.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str, keep_suffix: bool = False) -> Iterator[str]:
    """Yields a temporary path to write `path` through; renamed to `path` on success.
    `keep_suffix` for writers that insist on the final name's suffix (Keras' `.weights.h5`)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp{os.getpid()}-{name}" if keep_suffix
                       else f".{name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_atomic(path: str, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w",
                  **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
            f.write(data)


def write_json_atomic(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def writable_folder(path: str, flag: str) -> str:
    """Creates `path` if needed and checks a file can be written there, before any work
    starts; otherwise one UserError naming `--flag`, the folder and the reason."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise UserError(f"--{flag} {path}: cannot write there ({e.strerror}): choose a "
                        "writable folder") from None
    return path


def writable_file(path: str, flag: str) -> str:
    """Checks the folder of the output file `path` exists and is writable, before any work."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--{flag} {path}: the folder {folder} does not exist: create it or "
                        "choose another path")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"--{flag} {path}: cannot write there (permission denied): choose a "
                        "writable path")
    return path
