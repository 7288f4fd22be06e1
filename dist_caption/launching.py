"""The launcher's library: the host's GPUs and each worker's slice, the workers' environment,
the data preparation, running and supervising a group of processes, and restarting it from the
last checkpoint. `python -m dist_caption.launch` (launch/train.sh) is the command; its
docstring says what a worker gets and must do, and the exit statuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Callable, Mapping, NoReturn, Sequence

from dist_caption import cluster, config, console
from dist_caption.cluster import PEER_LOST, PEER_LOST_LINE, PREEMPTED, READY_FILE_ENV
from dist_caption.errors import UserError
from serving import declaring

STARTUP_TIMEOUT_EXIT = 3
USAGE_EXIT = 2
# The flags of `dist_caption.extract_features` that the launcher passes on to it: the
# dataset's, the extraction's and the cache's, as config.py declares them.
EXTRACTION_FLAGS = frozenset(f.name for f in config.preparation_settings()
                             if f.metadata["kind"] is not bool)
EXTRACTION_BOOL_FLAGS = frozenset(n for f in config.preparation_settings()
                                  if f.metadata["kind"] is bool for n in (f.name, f"no{f.name}"))
_POLL_SECONDS = 0.1


# ------------------------------------------------------------------------------------------------
# GPUs: the host's, and each worker's slice
# ------------------------------------------------------------------------------------------------

def nvidia_smi_listing() -> str:
    """What `nvidia-smi -L` prints, or '' without the tool or a working NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout if result.returncode == 0 else ""


def parse_gpu_listing(text: str) -> list[str]:
    """The GPUs of an `nvidia-smi -L` listing, as CUDA_VISIBLE_DEVICES entries: each line
    `GPU <i>: <name> (UUID: GPU-...)` gives its UUID (its index if the line has none). UUIDs,
    because nvidia-smi numbers GPUs in PCI bus order and CUDA, by default, fastest first."""
    gpus = []
    for m in re.finditer(r"^GPU (\d+):.*?(?:\(UUID: (GPU-[^)\s]+)\))?\s*$", text, re.M):
        gpus.append(m[2] or m[1])
    return gpus


def visible_devices(value: str) -> list[str]:
    """The GPUs a CUDA_VISIBLE_DEVICES value names; CUDA ignores an invalid entry (e.g. -1)
    and every entry after it."""
    gpus = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry or entry.startswith("-"):
            break
        gpus.append(entry)
    return gpus


def host_gpus(env: Mapping[str, str],
              listing: Callable[[], str] = nvidia_smi_listing) -> list[str]:
    """This host's GPUs as CUDA_VISIBLE_DEVICES entries: those `env`'s CUDA_VISIBLE_DEVICES
    names if it is set (the user's choice), else those `listing()` (`nvidia-smi -L`) lists."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return visible_devices(env["CUDA_VISIBLE_DEVICES"])
    return parse_gpu_listing(listing())


def split_gpus(gpus: Sequence[str], workers: int, per_worker: int | None) -> list[list[str]]:
    """Each worker's GPUs, disjoint slices of `gpus` in order: `per_worker` each, or by
    default all of them split evenly (none each on a host without GPUs). Raises `UserError`
    when the default split is uneven or more GPUs are asked for than `gpus` holds."""
    if per_worker is None:
        if len(gpus) % workers:
            divisors = [str(k) for k in range(1, len(gpus) + 1) if len(gpus) % k == 0]
            fix = f"use --workers {' or '.join(divisors)}"
            if workers < len(gpus):
                fix += (f", or --gpus_per_worker {len(gpus) // workers} (leaves "
                        f"{len(gpus) % workers} unused)")
            raise UserError(f"{len(gpus)} GPUs do not split evenly over {workers} workers: "
                            f"{fix}")
        per_worker = len(gpus) // workers
    if per_worker * workers > len(gpus):
        raise UserError(
            f"--gpus_per_worker {per_worker} x {workers} workers needs {per_worker * workers} "
            f"GPUs and this host has {len(gpus)}"
            + (f" ({', '.join(gpus)})" if gpus else " (CUDA_VISIBLE_DEVICES names none, or "
               "nvidia-smi -L lists none)")
            + ": ask for fewer, or use --cpu")
    return [list(gpus[i * per_worker:(i + 1) * per_worker]) for i in range(workers)]


# ------------------------------------------------------------------------------------------------
# TF_CONFIG and the worker's environment
# ------------------------------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_env(base: Mapping[str, str], tf_config: dict | None, ready_file: str | None,
               gpus: Sequence[str] | None) -> dict[str, str]:
    """`base` plus what a worker needs: TF_CONFIG (removed if None), the ready file, its GPUs
    (CUDA_VISIBLE_DEVICES: `gpus`, -1 if empty, unchanged if None) taking memory as needed, no
    proxy for the cluster's hosts, quiet TensorFlow C++ logs, unbuffered output (so its lines
    reach the launcher as they are printed)."""
    env = dict(base)
    env.pop("TF_CONFIG", None)
    hosts = ["localhost", "127.0.0.1"]
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
        hosts += [h.rsplit(":", 1)[0] for h in tf_config["cluster"]["worker"]]
    if ready_file is not None:
        env[READY_FILE_ENV] = ready_file
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus) or "-1"
    # Several processes on one host's GPUs: none may take all of a GPU's memory at start.
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    env.setdefault("TF_GPU_THREAD_MODE", "gpu_private")
    for key in ("no_proxy", "NO_PROXY"):
        have = [h for h in env.get(key, "").split(",") if h]
        env[key] = ",".join(have + [h for h in dict.fromkeys(hosts) if h not in have])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_pod(module: str, train_args: Sequence[str], cpu: bool) -> NoReturn:
    """Replaces this process by the pod's worker, `python -m module train_args`."""
    config = cluster.pod_tf_config(os.environ)
    single = len(config["cluster"]["worker"]) == 1
    env = worker_env(os.environ, None if single else config, None, [] if cpu else None)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *train_args], env)


# ------------------------------------------------------------------------------------------------
# Data preparation
# ------------------------------------------------------------------------------------------------

def check_training_args(train_args: Sequence[str], replicas: int) -> None:
    """The training flags' checks and rules (`config.check_training_args`), before any data is
    prepared: a UserError for the first broken one. `replicas` counts the workers' GPUs, or
    the workers on CPUs; with --cpu_devices or an explicit --strategy it is left to the
    workers, which know their strategy."""
    settings = declaring.from_args(config.TrainSettings, list(train_args))
    known = settings.strategy == "auto" and settings.cpu_devices <= 1
    try:
        config.check_training_args(list(train_args), replicas if known else None)
    except ValueError as e:
        raise UserError(str(e)) from None


def training_flags(train_args: Sequence[str], names: frozenset[str],
                   bool_names: frozenset[str] = frozenset()) -> list[str]:
    """The training flags named in `names` (valued) or `bool_names`, in order, as `--name=value`
    (or `--name` / `--noname`)."""
    out = []
    args = iter(train_args)
    for arg in args:
        name, eq, _ = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in names:
            out.append(arg if eq else f"--{name}={next(args, '')}")
        elif name.partition("=")[0] in bool_names:
            out.append(arg)
    return out


def extraction_args(train_args: Sequence[str]) -> list[str]:
    """The training flags that `extract_features` accepts too, in order, as `--name=value`."""
    return training_flags(train_args, EXTRACTION_FLAGS, EXTRACTION_BOOL_FLAGS)


def prepare_command(train_args: Sequence[str], force: bool) -> list[str] | None:
    """The feature extraction command to run before training, or None if not needed: needed
    when forced, or when the flags name no --cache_dir (the dataset's default cache is then
    built or checked; extraction is idempotent)."""
    args = extraction_args(train_args)
    values = dict(a[2:].partition("=")[::2] for a in args)
    if force or "cache_dir" not in values:
        return [sys.executable, "-m", "dist_caption.extract_features", *args]
    return None


# ------------------------------------------------------------------------------------------------
# Running and supervising a group of processes
# ------------------------------------------------------------------------------------------------

def _describe(code: int) -> str:
    """How a process ended, with the likely cause where the code tells it."""
    if code < 0:
        name = signal.Signals(-code).name
        return f"signal {name}" + (" (out of memory, or killed from outside)"
                                   if -code == signal.SIGKILL else "")
    if code == PEER_LOST:
        return f"exit code {code} (it lost a peer)"
    if code == PREEMPTED:
        return f"exit code {code} (it was stopped and checkpointed)"
    return f"exit code {code}"


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Output:
    """Copies each process's merged stdout+stderr to ours, line by line, with a prefix, and all
    of it to the process's log file. With a log file, the console leaves out known noise, and
    everything a worker prints once it has lost a peer or its group is being stopped after a
    failure (the tracebacks of collectives that cannot finish): the launcher says what
    happened in one line instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def say(self, line: str) -> None:
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def pump(self, stream: IO[bytes], prefix: str, log: IO[bytes] | None,
             gpus_expected: bool = False,
             quiet: threading.Event | None = None) -> threading.Thread:
        def copy() -> None:
            lost = False
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if log is not None:
                    log.write(raw)
                    log.flush()
                lost = lost or line.startswith(PEER_LOST_LINE)
                hidden = log is not None and (
                    lost or (quiet is not None and quiet.is_set())
                    or console.is_noise(line, gpus_expected)
                    or (quiet is not None and console.is_peer_failure(line)))
                if not hidden:
                    self.say(prefix + line)
            stream.close()
            if log is not None:
                log.close()

        thread = threading.Thread(target=copy, daemon=True)
        thread.start()
        return thread


class Signals:
    """Records SIGINT/SIGTERM sent to the launcher; the supervision loop forwards them."""

    def __init__(self) -> None:
        self.received: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, _: self.received.append(s))


@dataclasses.dataclass
class Task:
    """One process to supervise: its name in messages, output prefix, command, environment,
    the ready file it must create (None: no start-up check) and an optional log file."""

    name: str
    prefix: str
    command: list[str]
    env: dict[str, str]
    ready_file: str | None = None
    log: str | None = None


@dataclasses.dataclass
class Outcome:
    """How a group of processes ended: the launcher's exit status (see the module docstring)
    and why it stopped: "done", "failure" (a process failed), "timeout" (one did not join) or
    "signal" (the launcher was signalled)."""

    status: int
    reason: str


def supervise(tasks: Sequence[Task], opts: argparse.Namespace, signals: Signals,
              output: Output, quiet_on_failure: bool = False) -> Outcome:
    """Runs the tasks, each in its own process group, until all have exited.

    A failure (non-zero exit or signal) SIGTERMs the others, a missing ready file after
    `opts.startup_timeout` stops everyone, and a signal to the launcher is forwarded; SIGKILL
    follows after the grace period (at once on a second signal). Leftover members of each
    process group are SIGKILLed at the end, so no process outlives the launcher. With
    `quiet_on_failure` (workers that share collectives), what the tasks print after a failure,
    and TensorFlow's reports of failed collectives, go to their log files only.
    """
    procs, threads = [], []
    quiet = threading.Event() if quiet_on_failure else None
    try:
        for task in tasks:
            proc = subprocess.Popen(task.command, env=task.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            procs.append(proc)
            log = open(task.log, "ab") if task.log else None
            gpus = task.env.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")
            threads.append(output.pump(proc.stdout, task.prefix, log, gpus, quiet))
        return _watch(procs, tasks, opts, signals, output, quiet)
    finally:
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        for thread in threads:
            thread.join(timeout=5)


# A failure is announced this long after it is seen, so that the process that failed first
# is named rather than a peer that lost it (which exits within a moment).
_ANNOUNCE_DELAY = 0.5


def _watch(procs: Sequence[subprocess.Popen], tasks: Sequence[Task], opts: argparse.Namespace,
           signals: Signals, output: Output, quiet: threading.Event | None) -> Outcome:
    startup_deadline = time.monotonic() + opts.startup_timeout
    stop_reason, kill_at, announce_at, forwarded = None, None, None, 0
    ended: dict[int, int] = {}  # task -> exit code, in the order seen, before any SIGKILL
    seen_failed: set[int] = set()  # the tasks whose failure stopped the others

    def stop(reason: str, grace: float) -> None:
        nonlocal stop_reason, kill_at
        stop_reason, kill_at = reason, time.monotonic() + grace
        if quiet is not None and reason != "signal":
            quiet.set()
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)

    def culprits() -> list[int]:
        # The first failed; then any other that failed of itself: not those that lost a
        # peer, nor those that ended because we stopped them.
        first = [i for i in ended if ended[i] != 0 and i in seen_failed]
        ours = (PEER_LOST, PREEMPTED, -signal.SIGTERM, 128 + signal.SIGTERM)
        others = [i for i in ended if ended[i] not in (0, *ours) and i not in first]
        return [i for i in first if ended[i] != PEER_LOST] + others or first

    while True:
        codes = [proc.poll() for proc in procs]
        if kill_at is None or time.monotonic() < kill_at:
            for i, code in enumerate(codes):
                if code is not None and i not in ended:
                    ended[i] = code
        if len(signals.received) > forwarded:
            forwarded = len(signals.received)
            if stop_reason is None:
                stop("signal", opts.grace_seconds)
            else:
                kill_at = time.monotonic()
        if stop_reason is None:
            failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
            late = [] if time.monotonic() < startup_deadline else [
                i for i, code in enumerate(codes) if code is None and tasks[i].ready_file
                and not os.path.exists(tasks[i].ready_file)]
            if failed:
                seen_failed = set(failed)
                stop("failure", opts.failure_grace_seconds)
                announce_at = time.monotonic() + _ANNOUNCE_DELAY
            elif late:
                which = ",".join(str(i) for i in late)
                output.say(f"launch: worker(s) {which} did not join within "
                           f"{opts.startup_timeout:g} s; stopping")
                stop("timeout", opts.failure_grace_seconds)
        done = all(code is not None for code in codes)
        if announce_at is not None and (done or time.monotonic() >= announce_at):
            announce_at = None
            others = "; stopping the others" if len(procs) > 1 else ""
            output.say("launch: " + "; ".join(
                f"{tasks[i].name} exited with {_describe(ended[i])}" for i in culprits())
                + others)
        if done:
            break
        if kill_at is not None and time.monotonic() >= kill_at:
            for proc in procs:
                _signal_group(proc, signal.SIGKILL)
        time.sleep(_POLL_SECONDS)

    if stop_reason == "timeout":
        return Outcome(STARTUP_TIMEOUT_EXIT, "timeout")
    if stop_reason == "failure":
        return Outcome(_exit_status(ended[culprits()[0]]), "failure")
    if stop_reason == "signal":
        failed = [code for code in codes if code not in (0, PREEMPTED)]
        return Outcome(_exit_status(failed[0]) if failed else
                       PREEMPTED if PREEMPTED in codes else 0, "signal")
    return Outcome(0, "done")


# ------------------------------------------------------------------------------------------------
# Restarting the group
# ------------------------------------------------------------------------------------------------

def latest_checkpoint(model_dir: str | None) -> tuple[str, int] | None:
    """(path, step) of the run's latest checkpoint, from its `checkpoints/checkpoint` state
    file (the one `tf.train.latest_checkpoint` reads), or None without one."""
    if not model_dir:
        return None
    # The layout of run_dir.checkpoints_dir (not imported: run_dir imports TensorFlow).
    state = os.path.join(model_dir, "checkpoints", "checkpoint")
    try:
        if "://" in model_dir:
            import tensorflow as tf  # only for an object store: the launcher starts fast

            text = tf.io.gfile.GFile(state).read() if tf.io.gfile.exists(state) else ""
        else:
            with open(state) as f:
                text = f.read()
    except OSError:
        return None
    m = re.search(r'^model_checkpoint_path: "(.*?(\d+))"', text, re.M)
    if not m:
        return None
    path = m[1] if os.path.isabs(m[1]) or "://" in m[1] else os.path.join(
        model_dir, "checkpoints", m[1])
    return path, int(m[2])


def run_group(make_tasks: Callable[[], list[Task]], opts: argparse.Namespace,
              signals: Signals, output: Output, model_dir: str | None,
              resume_command: str) -> int:
    """Runs the workers `make_tasks()` gives; when one fails (or does not join), starts them
    all again from the run's last checkpoint, at most `opts.max_restarts` times. Returns the
    launcher's exit status."""
    for restart in range(opts.max_restarts + 1):
        outcome = supervise(make_tasks(), opts, signals, output, quiet_on_failure=True)
        if outcome.reason not in ("failure", "timeout") or signals.received:
            return outcome.status
        checkpoint = latest_checkpoint(model_dir)
        where = (f"from step {checkpoint[1]} ({checkpoint[0]})" if checkpoint else
                 "from the start (no checkpoint yet)")
        if outcome.status == USAGE_EXIT:  # bad flags or input: the same again
            return outcome.status
        if restart == opts.max_restarts:
            break
        output.say(f"launch: restart {restart + 1} of {opts.max_restarts}: every worker again, "
                   f"resuming {where}")
    output.say(f"launch: no restarts left (--max_restarts {opts.max_restarts}); "
               + (f"the last checkpoint is {checkpoint[0]} (step {checkpoint[1]}); resume with: "
                  if checkpoint else "no checkpoint was written; start again with: ")
               + resume_command)
    return outcome.status


# ------------------------------------------------------------------------------------------------
# A local run: data preparation, then the workers
# ------------------------------------------------------------------------------------------------

def share_cores(env: dict[str, str], n: int) -> dict[str, str]:
    """`env` for one of `n` processes sharing this host's cores: one thread pool each of
    cores / n threads (measured 2.3x faster than TensorFlow's default with 4 workers on 2
    cores), unless already set."""
    for key in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        env.setdefault(key, str(max(1, (os.cpu_count() or 1) // n)))
    return env


def prepare_tasks(command: list[str], n: int, env: Mapping[str, str],
                  log_dir: str | None) -> list[Task]:
    """The data preparation as `n` extraction processes (`--task_index i --num_tasks n`, each
    taking every n-th shard), or one when `n` is 1."""
    if n == 1:
        return [Task("data preparation", "[prep] ", command, dict(env),
                     log=os.path.join(log_dir, "prepare.log") if log_dir else None)]
    return [Task(f"data preparation {i}", f"[prep{i}] ",
                 [*command, f"--task_index={i}", f"--num_tasks={n}"], share_cores(dict(env), n),
                 log=os.path.join(log_dir, f"prepare-{i}.log") if log_dir else None)
            for i in range(n)]


def run_local(opts: argparse.Namespace, train_args: Sequence[str],
              argv: Sequence[str] = ()) -> int:
    """Prepares the data if needed, then runs `opts.workers` local workers to the end, each
    with its own slice of the host's GPUs, restarting them all after a failure (see
    `run_group`); `argv` (the launcher's arguments) makes the command that resumes the run."""
    n = opts.workers
    gpus = [] if opts.cpu else host_gpus(os.environ)
    slices = split_gpus(gpus, n, opts.gpus_per_worker)
    signals, output = Signals(), Output()
    model_dirs = training_flags(train_args, frozenset({"model_dir"}))
    model_dir = model_dirs[-1].partition("=")[2] if model_dirs else ""
    # Log files go beside the run, unless the run is on an object store (then only --log_dir).
    log_dir = opts.log_dir or (os.path.join(model_dir, "worker-logs")
                               if model_dir and "://" not in model_dir else None)
    if log_dir:
        try:
            os.makedirs(log_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write the worker logs in {log_dir} ({e.strerror}): choose "
                            "a writable --model_dir or --log_dir") from None
        output.say(f"launch: every line of each process in {log_dir}/ (worker-<i>.log, "
                   "prepare.log)")
    if opts.module == "dist_caption.train":
        check_training_args(train_args, n * len(slices[0]) if gpus else n)
    prepare = None if opts.no_prepare else prepare_command(train_args, opts.prepare)
    if prepare is not None:
        output.say("launch: preparing the data: " + " ".join(prepare[1:])
                   + (f" (split over {n} processes)" if n > 1 else ""))
        env = worker_env(os.environ, None, None, [] if opts.cpu else None)
        outcome = supervise(prepare_tasks(prepare, n, env, log_dir), opts, signals, output)
        if outcome.status != 0 or signals.received:
            return outcome.status or _exit_status(-signals.received[0])
    command = [sys.executable, "-m", opts.module, *train_args]
    if gpus:
        output.say("launch: GPUs: " + "; ".join(
            f"worker {i} {','.join(s) or 'none'}" for i, s in enumerate(slices))
            + (f" ({len(gpus) - n * len(slices[0])} left unused)"
               if n * len(slices[0]) < len(gpus) else ""))
    with tempfile.TemporaryDirectory(prefix="dist_caption-launch-") as run_dir:
        attempts = iter(range(opts.max_restarts + 1))

        def make_tasks() -> list[Task]:
            attempt = next(attempts)
            ports = free_ports(n) if n > 1 else []  # a restart never waits for a lingering port
            tasks = []
            for i in range(n):
                ready = os.path.join(run_dir, f"ready-{i}")
                if os.path.exists(ready):  # the last attempt's
                    os.remove(ready)
                # No GPU on the host: CUDA_VISIBLE_DEVICES stays as it was (unset, or naming
                # none).
                env = share_cores(worker_env(
                    os.environ, cluster.local_tf_config(ports, i) if n > 1 else None, ready,
                    slices[i] if gpus or opts.cpu else None), n)
                log = os.path.join(log_dir, f"worker-{i}.log") if log_dir else None
                if log and attempt:
                    with open(log, "a") as f:
                        f.write(f"launch: ---- restart {attempt} ----\n")
                tasks.append(Task(f"worker {i}", f"[w{i}] ", command, env, ready, log))
            hosts = ", ".join(f"localhost:{p}" for p in ports) or "single worker, no TF_CONFIG"
            output.say(f"launch: {n} x python -m {opts.module} ({hosts})")
            return tasks

        if not model_dir and opts.module == "dist_caption.train":
            model_dir = config.DEFAULT_MODEL_DIR
        resume = "launch/train.sh " + shlex.join(argv or sys.argv[1:])
        return run_group(make_tasks, opts, signals, output, model_dir, resume)
