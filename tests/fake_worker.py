"""A stand-in for `dist_caption.train` in the launcher tests: starts in milliseconds (no
TensorFlow) and behaves as told, per worker index.

    python -m fake_worker --modes wait,fail [--delay 0.5] [--grandchild] [training flags...]

Worker i takes the i-th mode (the last one for higher indices):
    ok        join (touch the ready file), exit 0
    fail      join, exit 1 after --delay seconds
    kill      join, SIGKILL itself after --delay seconds
    wait      join, run until SIGTERM, then "checkpoint" and exit 42 (preempted)
    stubborn  join, ignore SIGTERM, run until SIGKILLed
    late      never join, run until SIGTERM
    lost      join, after --delay seconds say "peer lost: ...", print a traceback, exit 43
              (what a real worker does when a collective fails because a peer is gone)
    usage     exit 2 with an `error:` line (bad flags: a restart would fail the same way)
--fail_times N makes `fail`, `kill` and `lost` fail only in the first N launches of this worker (counted
in --state_dir), and behave as `ok` after that: a group that a restart heals.
--grandchild also starts a child process that ignores SIGTERM, to check that the launcher
leaves no process behind. Every worker first prints `worker <i> pid <pid> ...` with its
TF_CONFIG, environment and arguments as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

STUBBORN_CHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="ok")
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--fail_times", type=int, default=0)
    parser.add_argument("--state_dir")
    parser.add_argument("--noise", action="store_true",
                        help="print TensorFlow's start-up notices and a real warning first")
    args, _ = parser.parse_known_args()
    tf_config = json.loads(os.environ["TF_CONFIG"]) if "TF_CONFIG" in os.environ else None
    index = tf_config["task"]["index"] if tf_config else 0
    modes = args.modes.split(",")
    mode = modes[min(index, len(modes) - 1)]
    if args.fail_times and mode in ("fail", "kill", "lost"):
        counter = os.path.join(args.state_dir, f"launches-{index}")
        launches = len(open(counter).read()) if os.path.exists(counter) else 0
        with open(counter, "a") as f:
            f.write("x")
        if launches >= args.fail_times:
            mode = "ok"
    env = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TF_FORCE_GPU_ALLOW_GROWTH",
                                          "TF_GPU_THREAD_MODE", "no_proxy", "NO_PROXY",
                                          "TF_CPP_MIN_LOG_LEVEL", "DIST_CAPTION_READY_FILE")}
    # Handlers first: a test may signal as soon as it reads the pid line.
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif mode == "lost":  # as the trainer: SIGTERM is noted, the failing collective ends it
        signal.signal(signal.SIGTERM, lambda *_: None)
    elif mode == "wait":
        signal.signal(signal.SIGTERM, lambda *_: (print("checkpointed", flush=True), sys.exit(42)))
    print(f"worker {index} pid {os.getpid()} " + json.dumps(
        {"mode": mode, "tf_config": tf_config, "env": env, "argv": sys.argv[1:]}))
    if args.noise:
        print("WARNING: All log messages before absl::InitializeLog() is called are written to "
              "STDERR", file=sys.stderr)
        print("E0000 00:00:1.5 9 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
              file=sys.stderr)
        print("W0000 00:00:1.6 9 train.py:1] a real warning", file=sys.stderr, flush=True)
    if args.grandchild:
        child = subprocess.Popen([sys.executable, "-c", STUBBORN_CHILD])
        print(f"grandchild pid {child.pid}")
    if mode != "late":
        if os.environ.get("DIST_CAPTION_READY_FILE"):  # unset in pod mode
            open(os.environ["DIST_CAPTION_READY_FILE"], "w").close()
        print("ready", flush=True)
    if mode == "ok":
        return
    if mode == "usage":
        print("error: flag --units=-1: must be a positive number", file=sys.stderr)
        sys.exit(2)
    if mode == "lost":  # later than `fail` and `kill`: a peer notices after the fact
        time.sleep(args.delay + 0.5)
        print("peer lost: UnavailableError: Collective ops is aborted by: recvmsg:Connection "
              "reset by peer; exiting 43", file=sys.stderr)
        print("Traceback (most recent call last):\n  File \"train.py\", line 1, in run\n"
              "tensorflow.python.framework.errors_impl.UnavailableError: Graph execution error:",
              file=sys.stderr, flush=True)
        sys.exit(43)
    if mode in ("fail", "kill"):
        time.sleep(args.delay)
        print(f"failing now ({mode})", file=sys.stderr, flush=True)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(1)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
