"""Files through `tf.io.gfile`, written so that a reader never sees half of one.

Every path of the project may be a local folder or a URL TensorFlow's filesystems know
(`gs://bucket/...`, `s3://...`, the in-memory `ram://...` the tests use): this module is the
one place that reads, writes and checks them.

Every writer goes through `atomic_path` (or the helpers on top of it): the data goes to a
hidden temporary name in the same folder (`.<name>.tmp<pid>`, so no reader globbing
`*.tfrecord` picks it up), and is renamed into place only once complete; a failure removes it.
On a local disk that rename is one rename(2). On an object store a rename is a server-side copy
then a delete; the copy creates the final object in one step (an object is never visible half
written), so a reader still sees either no file or the whole file. A process killed meanwhile
leaves the hidden file behind for its next run to clear.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import Iterable, Iterator

import tensorflow as tf

from dist_caption.errors import UserError

gfile = tf.io.gfile


def is_remote(path: str) -> bool:
    """True for a filesystem URL (gs://, s3://, ram://), False for a local path."""
    return "://" in path


def absolute(path: str) -> str:
    """`path` made absolute if local; URLs are absolute already."""
    return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return gfile.exists(path)


def isdir(path: str) -> bool:
    return gfile.isdir(path)


def makedirs(path: str) -> None:
    gfile.makedirs(path)


def listdir(path: str) -> list[str]:
    """The names in the folder `path` (no trailing slashes, whatever the filesystem)."""
    return [n.rstrip("/") for n in gfile.listdir(path)]


def remove(path: str) -> None:
    gfile.remove(path)


def size(path: str) -> int:
    return gfile.stat(path).length


def read_text(path: str) -> str:
    with gfile.GFile(path, "r") as f:
        return f.read()


def copy(source: str, target: str) -> None:
    """Copies one file atomically (either filesystem may be remote)."""
    with atomic_path(target) as tmp:
        gfile.copy(source, tmp, overwrite=True)


@contextlib.contextmanager
def atomic_path(path: str, keep_suffix: bool = False) -> Iterator[str]:
    """Yields a temporary path to write `path` through; renamed to `path` on success.
    `keep_suffix` for writers that insist on the final name's suffix (Keras' `.weights.h5`)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp{os.getpid()}-{name}" if keep_suffix
                       else f".{name}.tmp{os.getpid()}")
    try:
        yield tmp
        gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        with contextlib.suppress(tf.errors.NotFoundError, FileNotFoundError):
            gfile.remove(tmp)
        raise


def write_atomic(path: str, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        with gfile.GFile(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)


def write_lines_atomic(path: str, lines: Iterable[bytes]) -> None:
    """Writes `lines` (each ending in a newline) one after the other, atomically."""
    with atomic_path(path) as tmp:
        with gfile.GFile(tmp, "wb") as f:
            f.write(b"")  # a GFile creates its file on the first write: none would be no file
            for line in lines:
                f.write(line)


def write_json_atomic(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


def read_json(path: str):
    return json.loads(read_text(path))


def _reason(e: Exception) -> str:
    return (getattr(e, "strerror", None) or getattr(e, "message", None)
            or str(e)).strip().splitlines()[0]


def writable_folder(path: str, flag: str) -> str:
    """Creates `path` if needed and checks a file can be written there, before any work
    starts; otherwise one UserError naming `--flag`, the folder and the reason."""
    probe = os.path.join(path, f".write-check-{secrets.token_hex(4)}")
    try:
        gfile.makedirs(path)
        with gfile.GFile(probe, "w") as f:
            f.write("")
        gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        raise UserError(f"--{flag} {path}: cannot write there ({_reason(e)}): choose a "
                        "writable folder") from None
    return path


def writable_file(path: str, flag: str) -> str:
    """Checks the folder of the output file `path` exists and is writable, before any work."""
    if is_remote(path):
        writable_folder(os.path.dirname(path), flag)
        return path
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--{flag} {path}: the folder {folder} does not exist: create it or "
                        "choose another path")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"--{flag} {path}: cannot write there (permission denied): choose a "
                        "writable path")
    return path
