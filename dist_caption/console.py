"""What a user sees of a run: every line goes to the log file, known noise stays out of sight.

TensorFlow prints, from every process, start-up banners and notices that no user can act on
(`NOISE`). The launcher (for its workers) and the shell scripts (through
`python -m dist_caption.log_filter LOG_FILE`, a filtering `tee`) keep those lines in the log files
only; every other command leaves them out of its own standard error (`quiet_stderr`). Everything else, warnings and errors included, is shown. A CUDA start-up failure is noise
only where no GPU was expected; on a GPU host it is shown.

    >>> is_noise("WARNING: All log messages before absl::InitializeLog() is called are "
    ...          "written to STDERR")
    True
    >>> cuda = "E0000 00:00:1.2 77 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR"
    >>> is_noise(cuda), is_noise(cuda, gpus_expected=True)
    (True, False)
    >>> is_noise("W1201 train.py:12] could not write the step-40 checkpoint")
    False
    >>> is_noise("Input file read error")  # libjpeg, beside our line naming the file
    True
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import threading

# Each: printed by TensorFlow on every start or checkpoint, on every machine of this kind.
NOISE = tuple(re.compile(p) for p in (
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"oneDNN custom operations are on",
    r"oneDNN supports DT_HALF only on platforms with AVX-512",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning: Could not find TensorRT",
    r"Sharding callback duration",
    r"TFRecordDataset `buffer_size` is unspecified",
    r"^I0000 00:00:",  # C++ INFO lines logged before TF_CPP_MIN_LOG_LEVEL is read
    # libjpeg's bare warning on a truncated JPEG: the extraction's skip line names the file.
    r"^(Corrupt JPEG data: .*|Premature end of JPEG file|Input file read error)$",
))
# Noise only on a machine where no GPU was asked for.
NO_GPU_NOISE = tuple(re.compile(p) for p in (
    r"failed call to cuInit",
    r"Could not find cuda drivers on your machine, GPU will not be used",
    r"Cannot dlopen some GPU libraries",
))

# TensorFlow's C++ reports of collectives and heartbeats that failed because a peer was lost:
# the launcher says which worker failed, and these stay in the worker logs.
PEER_FAILURE = tuple(re.compile(p) for p in (
    r"^[EW]\d{4} [\d:. ]+\d+ (ring_alg|base_collective_executor|collective_\w+|"
    r"coordination_service\w*|grpc_\w+|rpc_collective_executor\w*)\.cc:\d+\]",
    r"^Additional GRPC error information from remote target",
    r"^:\{?UNKNOWN:",
))


def is_peer_failure(line: str) -> bool:
    """Whether `line` is one of TensorFlow's reports of a lost peer (see `PEER_FAILURE`)."""
    return any(p.search(line) for p in PEER_FAILURE)


def is_noise(line: str, gpus_expected: bool = False) -> bool:
    """Whether `line` is one of TensorFlow's known notices (see `NOISE`)."""
    patterns = NOISE if gpus_expected else NOISE + NO_GPU_NOISE
    return any(p.search(line) for p in patterns)


def quiet_stderr() -> None:
    """From now on, this process's standard error (its file descriptor 2: Python's lines and
    TensorFlow's C++ ones alike) leaves out the noise; what a command calls before it loads
    TensorFlow. Every other line is passed on, in order; all are flushed at exit. A GPU
    start-up failure stays visible where `nvidia-smi` exists."""
    gpus = shutil.which("nvidia-smi") is not None
    sys.stderr.flush()
    shown = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pass_on() -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if not is_noise(line.decode("utf-8", "replace"), gpus):
                    os.write(shown, line)

    thread = threading.Thread(target=pass_on, name="quiet_stderr", daemon=True)
    thread.start()

    def drain() -> None:  # the last lines reach the terminal before the process ends
        sys.stderr.flush()
        os.dup2(shown, 2)  # closes the pipe's last writer: the thread reads to the end
        thread.join(timeout=5)

    _drains.append(drain)
    atexit.register(release_stderr)


_drains: list = []


def release_stderr() -> None:
    """Passes on what `quiet_stderr` holds and gives standard error back: at exit, and before
    an `os._exit` (which runs no exit handlers)."""
    while _drains:
        _drains.pop()()
