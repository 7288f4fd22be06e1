"""Starting the local server in its own process and waiting until it serves: the one way the
tests, the benchmarks and the quickstart do it.

    proc, ports = start(["--model_base_path=exports/caption", "--port=0"], "ready.json")
    # ports == {"port": 40123, "rest_port": 0, ...}, the server's ready file

    # From bash (the quickstart): wait for a server started in the background, print its port.
    python -m serving.local_server.wait READY_FILE PID [TIMEOUT_SECONDS]

The server writes its ready file (`--ready_file`, JSON with the bound ports) once its first
model version is loaded and both listeners are up. Imports no TensorFlow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import IO, Mapping

POLL_SECONDS = 0.05
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DidNotStart(RuntimeError):
    """The server exited, or was not ready in time (it is then killed)."""


def wait(ready_file: str, process: subprocess.Popen | int, timeout: float = 120) -> dict:
    """The ready file's content once `process` (a Popen, or a pid) has written it; DidNotStart
    if the process exits first, or after `timeout` seconds (a Popen is then killed)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready_file):
        if not _alive(process):
            status = (f" (status {process.returncode})"
                      if isinstance(process, subprocess.Popen) else "")
            raise DidNotStart(f"the local server exited before it was ready{status}")
        if time.monotonic() > deadline:
            if isinstance(process, subprocess.Popen):
                process.kill()  # never left running behind a failed start
                process.wait()
            raise DidNotStart(f"the local server was not ready after {timeout:g} s")
        time.sleep(POLL_SECONDS)
    with open(ready_file) as f:
        return json.load(f)


def start(args: list[str], ready_file: str, *, log: IO | int = subprocess.DEVNULL,
          env: Mapping[str, str] | None = None, timeout: float = 120
          ) -> tuple[subprocess.Popen, dict]:
    """`python -m serving.local_server ARGS --ready_file READY_FILE`, once it serves: (the
    process, the ports its ready file names). Its output goes to `log`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.local_server", *args, f"--ready_file={ready_file}"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT if log is not subprocess.DEVNULL
        else subprocess.DEVNULL, env=dict(env) if env is not None else None)
    return process, wait(ready_file, process, timeout)


def _alive(process: subprocess.Popen | int) -> bool:
    if isinstance(process, subprocess.Popen):
        return process.poll() is None
    try:
        os.kill(process, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent shell) counts as exited.
    try:
        with open(f"/proc/{process}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
