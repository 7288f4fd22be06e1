"""Starts the training workers: N local processes with TF_CONFIG, or one Kubernetes pod's worker.

    launch/train.sh --workers 2 --cpu [training flags...]        # = python -m dist_caption.launch
    python -m dist_caption.launch --pod [training flags...]      # Indexed Job pod entrypoint

The launcher's own options are below (`--help`); every other argument goes unchanged to each
worker, `python -m dist_caption.train [training flags...]`.

What a worker gets, and must do:
- `TF_CONFIG`: the same `cluster.worker` list for every worker, its own `task.index`; index 0
  is the chief. Absent with one worker (plain single-worker training).
- `CUDA_VISIBLE_DEVICES`: its own GPUs, a disjoint slice of the host's (`--gpus_per_worker`,
  by default the host's GPUs split evenly over the local workers; `-1` with `--cpu`). The
  host's GPUs are the launcher's own CUDA_VISIBLE_DEVICES if set, else those `nvidia-smi -L`
  lists. Also `TF_FORCE_GPU_ALLOW_GROWTH=true` (each process takes GPU memory as it needs it,
  not all of it at start) and `TF_GPU_THREAD_MODE=gpu_private` (GPU kernels launched from
  their own threads, not queued behind tf.data's), unless already set.
- `DIST_CAPTION_READY_FILE`: a path to create once the worker has joined the cluster (after its
  first collective). A worker that has not created it within `--startup_timeout` is taken as
  hung: the TensorFlow coordination service would otherwise wait an hour for it.
- SIGTERM (forwarded from SIGINT/SIGTERM to the launcher): checkpoint, then exit 0 if training
  was finished or 42 (`PREEMPTED`) to say "relaunch me to resume". SIGKILL follows after
  `--grace_seconds`, or at once on a second signal.
- A lost peer: print a line starting `peer lost:` and exit 43 (`PEER_LOST`, see
  dist_caption/cluster.py); what it prints from then on goes to its log file only.

When a worker fails (a signal, a non-zero exit, 43, or no join within `--startup_timeout`),
the others get SIGTERM (SIGKILL after `--failure_grace_seconds`), and then every worker starts
again on new ports, resuming from the run's last checkpoint, at most `--max_restarts` times;
bad flags (exit 2) are not restarted. Once a group is being stopped, its workers' output goes
to their log files only: the console gets one line naming the worker that failed and how, and
one for the restart (or, with none left, the last checkpoint and the command that resumes).
In pod mode the launcher sets no ready file; one set by the manifest (e.g. for a startup probe)
is passed on.

Exit status of the launcher:
    0    every worker exited 0
    42   stopped by SIGINT/SIGTERM and the workers checkpointed (each exited 0 or 42)
    3    a worker did not join within --startup_timeout
    2    bad launcher options or pod environment
    else, once the restarts are used up, the exit code of the worker that failed first
         (128+N if it died of signal N), or the exit code of the data preparation step

Before starting the workers of a local run, `python -m dist_caption.extract_features` runs with
the dataset flags among the training flags if they name no `--cache_dir` (it builds, or checks,
the dataset's default cache), or if `--prepare` is given; `--no_prepare` skips it. With
`--workers N` it runs as N cooperating processes (`--task_index i --num_tasks N`: each extracts
every N-th shard, task 0 also writes the vocabulary first and the manifest last), all finished
before training starts. Pod mode never prepares: launch/pod_entrypoint.sh runs each pod's
extraction task itself.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from dist_caption import launching
from dist_caption.cli import fail
from dist_caption.errors import UserError


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with our one-line `error: ...` and exit status 2 instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's options, and the rest of `argv` (the training flags) unchanged."""
    p = _Parser(prog="launch/train.sh", allow_abbrev=False,
                description="Starts dist_caption training workers; unknown arguments are "
                            "passed to every worker.")
    p.add_argument("--workers", type=int, default=1, help="Local worker processes.")
    p.add_argument("--startup_timeout", type=float, default=300.0,
                   help="Seconds for every worker to join the cluster, else exit 3.")
    p.add_argument("--grace_seconds", type=float, default=60.0,
                   help="After forwarding SIGINT/SIGTERM, seconds before SIGKILL.")
    p.add_argument("--failure_grace_seconds", type=float, default=15.0,
                   help="After a worker failed, seconds before the others are SIGKILLed.")
    p.add_argument("--max_restarts", type=int, default=3,
                   help="When a worker fails (signal, error, lost peer, no join), stop every "
                        "worker and start them all again, resuming from the last checkpoint, "
                        "at most this many times (0: stop at the first failure).")
    p.add_argument("--log_dir", help="Write each worker's whole output to DIR/worker-<i>.log "
                   "(default: <--model_dir>/worker-logs when a local --model_dir is given); the console "
                   "then leaves out TensorFlow's known start-up and checkpoint notices "
                   "(dist_caption.console.NOISE). Without a log, every line is shown.")
    p.add_argument("--module", default="dist_caption.train", help="The worker's Python module.")
    p.add_argument("--cpu", action="store_true", help="Hide GPUs (CUDA_VISIBLE_DEVICES=-1).")
    p.add_argument("--gpus_per_worker", type=int,
                   help="GPUs of this host given to each local worker, a disjoint slice each "
                        "(default: the host's GPUs split evenly over --workers).")
    p.add_argument("--pod", action="store_true",
                   help="Become this Kubernetes Indexed Job pod's worker (TF_CONFIG from env).")
    prep = p.add_mutually_exclusive_group()
    prep.add_argument("--prepare", action="store_true", help="Always run extract_features first.")
    prep.add_argument("--no_prepare", action="store_true", help="Never run extract_features.")
    opts, rest = p.parse_known_args(argv)
    if opts.workers < 1:
        p.error(f"--workers must be at least 1, got {opts.workers}")
    if opts.gpus_per_worker is not None and opts.gpus_per_worker < 1:
        p.error(f"--gpus_per_worker must be at least 1, got {opts.gpus_per_worker} (use --cpu "
                f"to train without GPUs)")
    if opts.cpu and opts.gpus_per_worker:
        p.error("--cpu hides every GPU: drop --gpus_per_worker or --cpu")
    if opts.pod and opts.gpus_per_worker:
        p.error("--gpus_per_worker is for local workers: a pod's worker uses the GPUs "
                "Kubernetes gives its container (nvidia.com/gpu)")
    if opts.max_restarts < 0:
        p.error(f"--max_restarts must not be negative, got {opts.max_restarts}")
    if opts.startup_timeout <= 0:
        p.error(f"--startup_timeout must be a positive number of seconds, "
                f"got {opts.startup_timeout:g}")
    for name in ("grace_seconds", "failure_grace_seconds"):
        if getattr(opts, name) < 0:
            p.error(f"--{name} must not be negative, got {getattr(opts, name):g}")
    return opts, rest


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts, train_args = parse_args(argv)
    try:
        if opts.pod:
            launching.run_pod(opts.module, train_args, opts.cpu)
        return launching.run_local(opts, train_args, argv)
    except UserError as e:
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
