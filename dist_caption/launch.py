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

from dist_caption import config, launching
from dist_caption.cli import fail
from dist_caption.errors import UserError
from serving import declaring


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with our one-line `error: ...` and exit status 2 instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's options (`config.LaunchSettings`), checked, and the rest of `argv` (the
    training flags) unchanged."""
    p = _Parser(prog="launch/train.sh", allow_abbrev=False,
                description="Starts dist_caption training workers; unknown arguments are "
                            "passed to every worker.")
    declaring.add_arguments(p, config.LaunchSettings)
    opts, rest = p.parse_known_args(argv)
    error = declaring.first_error(opts, config.LaunchSettings, config.LAUNCH_RULES)
    if error:
        p.error(error)
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
