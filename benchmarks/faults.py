"""Real faults in multi-worker training, each worker on its own network stack.

    .venv/bin/python benchmarks/faults.py [--workers 2] [--faults kill_worker,kill_chief,...]

Needs root and `ip` (iproute2). Each worker runs in its own network namespace with its own
address in 198.18.0.0/24 (RFC 2544's block for test networks: no real host has one), its
veth pair joined to the others' by a bridge, so a worker's link can be cut as a host's would
be. The group runs under the launcher's own `run_group` (restarts included: `--max_restarts`),
on a small synthetic cache; while it trains, after its first checkpoint, one fault is injected:

    kill_worker   SIGKILL a non-chief worker
    kill_chief    SIGKILL worker 0 (the chief, which hosts the coordination service)
    link_down     `ip link set <its veth> down` for a non-chief worker, up again LINK_DOWN_S later
    stall         SIGSTOP a non-chief worker (it never resumes: the launcher SIGKILLs it)

and measured: how long until the first worker notices (exits, 43 for a lost peer), until every
process of that group is gone (none may hang), which checkpoint the restart resumes from
against the latest one at the fault, the steps lost (estimated from the step rate: the steps
trained since that checkpoint), and whether the finished run's weights equal those of an
uninterrupted run of the same flags (exactly: the run resumes exactly). Writes
benchmarks/results/faults.json; docs/performance.md's table is generated from it.

The timeouts in force are the trainer's defaults (`--heartbeat_timeout`, `--collective_timeout`)
and the launcher's (`--failure_grace_seconds`, `--startup_timeout`).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from dist_caption import cluster, launching  # noqa: E402

FAULTS = ("kill_worker", "kill_chief", "link_down", "stall")
SUBNET = "198.18.0"
PORT = 2222
LINK_DOWN_S = 20.0
# Small and deterministic: 2 epochs of 60 steps, a checkpoint every 20.
TRAIN_FLAGS = ["--units=16", "--num_heads=2", "--num_layers=1", "--max_len=24",
               "--global_batch_size=20", "--epochs=2", "--steps_per_epoch=60",
               "--warmup_steps=2", "--learning_rate=3e-3", "--dropout=0", "--eval_images=0",
               "--log_every=10", "--noshuffle", "--patience=0", "--xla=false",
               "--checkpoint_every=20"]
CHECKPOINT_EVERY = 20


def netns_available() -> str | None:
    """None if this process can make network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    probe = f"dcprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Network:
    """`n` hosts, each a network namespace with one veth into a shared bridge:
    host i is 198.18.0.<i+1>. Torn down on exit (and any leftover of an earlier run first)."""

    def __init__(self, n: int, name: str = "dcf"):
        self.n, self.name = n, name
        self.bridge = f"{name}-br"

    def namespace(self, i: int) -> str:
        return f"{self.name}-w{i}"

    def veth(self, i: int) -> str:
        return f"{self.name}-v{i}"

    def host(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    @staticmethod
    def _ip(*args: str, check: bool = True) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True)
        if check and result.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    def __enter__(self) -> "Network":
        self.__exit__()
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("link", "set", self.bridge, "up")
        for i in range(self.n):
            ns = self.namespace(i)
            self._ip("netns", "add", ns)
            self._ip("link", "add", self.veth(i), "type", "veth", "peer", "name", "eth0",
                     "netns", ns)
            self._ip("link", "set", self.veth(i), "master", self.bridge, "up")
            self._ip("-n", ns, "addr", "add", f"{self.host(i)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *_) -> None:
        for i in range(self.n):
            self._ip("netns", "del", self.namespace(i), check=False)
        self._ip("link", "del", self.bridge, check=False)

    def link(self, i: int, up: bool) -> None:
        self._ip("link", "set", self.veth(i), "up" if up else "down")

    def run_in(self, i: int, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(i), *command]


class _TimedOutput(launching.Output):
    """The launcher's console output, each line also kept with the time it was said."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []

    def say(self, line: str) -> None:
        self.lines.append((time.monotonic(), line))
        super().say(line)


def worker_pids(model_dir: str) -> dict[int, int]:
    """Task index -> pid of each running `dist_caption.train` of this run."""
    pids = {}
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{proc}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"dist_caption.train" not in argv or f"--model_dir={model_dir}".encode() \
                    not in argv:
                continue
            with open(f"{proc}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            index = json.loads(env[b"TF_CONFIG"])["task"]["index"]
            pids[index] = int(os.path.basename(proc))
        except (OSError, KeyError, ValueError):
            continue
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def watch_checkpoints(model_dir: str, seen: dict[int, float], stop: threading.Event) -> None:
    """Records when each checkpoint step first appears in the run's state file."""
    while not stop.is_set():
        found = launching.latest_checkpoint(model_dir)
        if found and found[1] not in seen:
            seen[found[1]] = time.monotonic()
        time.sleep(0.02)


def run_group(net: Network, model_dir: str, cache_dir: str, max_restarts: int,
              output: launching.Output, extra_flags: Sequence[str] = ()) -> int:
    """The launcher's restart loop over one worker per namespace; its exit status."""
    n = net.n
    train_args = [f"--cache_dir={cache_dir}", f"--model_dir={model_dir}", *TRAIN_FLAGS,
                  *extra_flags]
    log_dir = os.path.join(model_dir, "worker-logs")
    os.makedirs(log_dir, exist_ok=True)
    opts = argparse.Namespace(max_restarts=max_restarts, startup_timeout=180.0,
                              grace_seconds=30.0, failure_grace_seconds=15.0)
    ready_dir = tempfile.mkdtemp(prefix="faults-ready-")
    attempts = itertools.count()

    def make_tasks() -> list[launching.Task]:
        attempt = next(attempts)
        hosts = [f"{net.host(i)}:{PORT}" for i in range(n)]
        tasks = []
        for i in range(n):
            ready = os.path.join(ready_dir, f"ready-{attempt}-{i}")
            env = launching.share_cores(launching.worker_env(
                os.environ, cluster.tf_config(hosts, i), ready, []), n)
            command = net.run_in(i, [sys.executable, "-m", "dist_caption.train", *train_args])
            tasks.append(launching.Task(f"worker {i}", f"[w{i}] ", command, env, ready,
                                     os.path.join(log_dir, f"worker-{i}.log")))
        return tasks

    try:
        return launching.run_group(make_tasks, opts, launching.Signals(), output, model_dir,
                                "(benchmark)")
    finally:
        shutil.rmtree(ready_dir, ignore_errors=True)


def inject(fault: str, net: Network, model_dir: str, record: dict, seen: dict[int, float],
           stop: threading.Event, victim: int, interval_s: float,
           link_down_s: float = LINK_DOWN_S) -> None:
    """Waits for the first checkpoint and half a checkpoint interval more (`interval_s`, the
    reference run's), injects `fault`, then watches that group's processes until they are all
    gone, recording the times."""
    while not stop.is_set() and CHECKPOINT_EVERY not in seen:
        time.sleep(0.02)
    if stop.is_set():
        return
    time.sleep(interval_s / 2)
    pids = worker_pids(model_dir)
    latest = max(seen)
    record["latest_checkpoint_at_fault"] = latest
    t0 = time.monotonic()
    if fault == "kill_worker":
        os.kill(pids[victim], signal.SIGKILL)
    elif fault == "kill_chief":
        os.kill(pids[0], signal.SIGKILL)
    elif fault == "stall":
        os.kill(pids[victim], signal.SIGSTOP)
    elif fault == "link_down":
        net.link(victim, up=False)
    record["since_checkpoint_s"] = round(t0 - seen[latest], 2)
    exits: dict[int, float] = {}
    restored = False
    while (len(exits) < len(pids) or (fault == "link_down" and not restored)) \
            and time.monotonic() - t0 < 300:
        now = time.monotonic()
        for i, pid in pids.items():
            if i not in exits and not alive(pid):
                exits[i] = now - t0
                if len(exits) == len(pids):
                    # A step whose all-reduce finished before the fault may still be saved
                    # (saving needs no peer): the restart must resume from this one.
                    gone = launching.latest_checkpoint(model_dir)
                    record["latest_checkpoint_at_exit"] = gone[1] if gone else 0
        if fault == "link_down" and not restored and now - t0 >= link_down_s:
            net.link(victim, up=True)
            restored = True
        time.sleep(0.02)
    faulted = {"kill_worker": victim, "stall": victim, "kill_chief": 0}.get(fault)
    noticed = [t for i, t in exits.items() if i != faulted]
    record.update(
        noticed_s=round(min(noticed), 2) if noticed else None,
        group_gone_s=round(max(exits.values()), 2) if len(exits) == len(pids) else None,
        exits_s={str(i): round(t, 2) for i, t in sorted(exits.items())},
        hung=len(exits) < len(pids))


def one_run(fault: str | None, net: Network, cache_dir: str, root: str,
            interval_s: float = 0.0, max_restarts: int = 2, victim: int = 1,
            extra_flags: Sequence[str] = (), link_down_s: float = LINK_DOWN_S) -> dict:
    """One training run of `TRAIN_FLAGS` (and `extra_flags`) with `fault` injected (None:
    uninterrupted)."""
    model_dir = os.path.join(root, fault or "uninterrupted")
    shutil.rmtree(model_dir, ignore_errors=True)
    output = _TimedOutput()
    record: dict = {"fault": fault or "none"}
    stop, seen = threading.Event(), {}
    threads = [threading.Thread(target=watch_checkpoints, args=(model_dir, seen, stop),
                                daemon=True)]
    if fault:
        threads.append(threading.Thread(target=inject, daemon=True, args=(
            fault, net, model_dir, record, seen, stop, victim, interval_s, link_down_s)))
    for thread in threads:
        thread.start()
    start = time.monotonic()
    status = run_group(net, model_dir, cache_dir, max_restarts, output, extra_flags)
    record["wall_s"] = round(time.monotonic() - start, 1)
    stop.set()
    for thread in threads:
        thread.join(timeout=320)
    steps = sorted(seen)
    if not fault and len(steps) >= 2:  # the steady rate: between the first two checkpoints
        record["steps_per_s"] = round((steps[1] - steps[0]) / (seen[steps[1]] - seen[steps[0]]),
                                      2)
    record["exit_status"] = status
    said = [line for _, line in output.lines]
    record["console"] = [l for l in said if l.startswith("launch: ")]
    resumed = [re.search(r"resuming from step (\d+)", l) for l in said]
    resumed = [int(m[1]) for m in resumed if m]
    record["resumed_from"] = resumed[0] if resumed else (0 if any(
        "from the start" in l for l in said) else None)
    record["restarts"] = sum(1 for l in said if re.match(r"launch: restart \d+ of", l))
    final = launching.latest_checkpoint(model_dir)
    record["final_step"] = final[1] if final else None
    record["model_dir"] = model_dir
    return record


def equal_weights(a: str, b: str) -> bool:
    """Whether two checkpoints hold exactly the same values, every variable."""
    import numpy as np
    import tensorflow as tf

    ra, rb = tf.train.load_checkpoint(a), tf.train.load_checkpoint(b)
    names = set(ra.get_variable_to_shape_map())
    if names != set(rb.get_variable_to_shape_map()):
        return False
    return all(np.array_equal(ra.get_tensor(n), rb.get_tensor(n)) for n in names
               if n != "_CHECKPOINTABLE_OBJECT_GRAPH")


def make_cache(root: str) -> str:
    """A 40-scene synthetic dataset and its `patches` cache under `root`."""
    from dist_caption.data import cache, sources
    from dist_caption.data.records import LoadReport

    cache_dir = os.path.join(root, "cache")
    if not os.path.exists(os.path.join(cache_dir, "manifest.json")):
        records = sources.synthetic_records(os.path.join(root, "synthetic"), 40, 0, 64,
                                            LoadReport())
        cache.extract(records, cache_dir, cache.ExtractionSettings(
            "synthetic", "patches", "none", shard_size=64),
            source={"synthetic_dir": os.path.join(root, "synthetic")})
    return cache_dir


def compare(reference: dict, record: dict) -> None:
    """Adds the weights comparison and the estimated steps lost to `record`."""
    ref_final = launching.latest_checkpoint(reference["model_dir"])
    final = launching.latest_checkpoint(record["model_dir"])
    record["weights_equal"] = bool(final and ref_final and final[1] == ref_final[1]
                                   and equal_weights(final[0], ref_final[0]))
    # Steps trained before the fault (the latest checkpoint then, plus the time since it at the
    # reference's rate) that the restart trains again: all past the checkpoint it resumed from.
    trained = record.get("latest_checkpoint_at_fault", 0) + record.get(
        "since_checkpoint_s", 0.0) * reference["steps_per_s"]
    record["steps_lost"] = max(0, round(trained) - (record["resumed_from"] or 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "dc-faults"))
    p.add_argument("--out", help="JSON path (default benchmarks/results/faults.json)")
    args = p.parse_args()
    why = netns_available()
    if why:
        sys.exit(f"faults: cannot run here: {why}")
    os.makedirs(args.work_dir, exist_ok=True)
    cache_dir = make_cache(args.work_dir)
    from results_file import publish

    with Network(args.workers) as net:
        reference = one_run(None, net, cache_dir, args.work_dir)
        interval_s = CHECKPOINT_EVERY / reference["steps_per_s"]
        runs = []
        for fault in args.faults.split(","):
            record = one_run(fault, net, cache_dir, args.work_dir, interval_s)
            compare(reference, record)
            runs.append(record)
    publish("faults", {"workers": args.workers, "checkpoint_every": CHECKPOINT_EVERY,
                       "reference": reference, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
