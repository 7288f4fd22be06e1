"""Real faults in real multi-worker training: a worker SIGKILLed under `launch/train.sh`, and a
worker's network link cut with each worker on its own network stack (`ip netns`); the group
restarts, resumes from the last checkpoint, and ends with the weights of an uninterrupted run.

The network-namespace harness is `benchmarks/faults.py`, which measures all four faults (kill
a worker, kill the chief, cut a link, stall a worker) for docs/performance.md's table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import faults  # noqa: E402

from dist_caption import cluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("faults")]  # one reference run
TRAIN_SH = os.path.join(ROOT, "launch", "train.sh")


def train_sh(cache_dir: str, model_dir: str, *extra: str, timeout: float = 400):
    """`launch/train.sh --workers 2` over the fault harness's flags, started (not waited)."""
    return subprocess.Popen(
        [TRAIN_SH, "--workers", "2", "--cpu", "--no_prepare", f"--cache_dir={cache_dir}",
         f"--model_dir={model_dir}", *faults.TRAIN_FLAGS, *extra], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory):
    """An uninterrupted 2-worker run: its final checkpoint (path, step)."""
    model_dir = str(tmp_path_factory.mktemp("faults") / "uninterrupted")
    proc = train_sh(tiny_cache[1], model_dir)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return faults.launching.latest_checkpoint(model_dir)


def test_a_worker_killed_after_a_checkpoint_costs_no_more_than_the_interval(
        tiny_cache, reference, tmp_path):
    """launch/train.sh --workers 2 --max_restarts 2, worker 1 SIGKILLed after the first
    checkpoint: exit 0, no traceback on the console, the final step and every weight equal to
    the uninterrupted run's."""
    model_dir = str(tmp_path / "run")
    proc = train_sh(tiny_cache[1], model_dir, "--max_restarts", "2")
    first = os.path.join(model_dir, "checkpoints", f"ckpt-{faults.CHECKPOINT_EVERY}.index")
    deadline = time.monotonic() + 300
    while not os.path.exists(first):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(faults.worker_pids(model_dir)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err and "Error" not in out + err
    said = [l for l in out.splitlines() if l.startswith("launch: ")]
    assert "launch: worker 1 exited with signal SIGKILL (out of memory, or killed from " \
        "outside); stopping the others" in said
    restarts = [l for l in said if l.startswith("launch: restart")]
    assert len(restarts) == 1 and restarts[0].startswith(
        "launch: restart 1 of 2: every worker again, resuming from step ")
    resumed = int(restarts[0].split("resuming from step ")[1].split()[0])
    assert resumed >= faults.CHECKPOINT_EVERY  # at most one interval lost
    final = faults.launching.latest_checkpoint(model_dir)
    assert final[1] == reference[1]
    assert faults.equal_weights(final[0], reference[0])


@pytest.mark.alone
@pytest.mark.skipif(faults.netns_available() is not None,
                    reason=f"network namespaces: {faults.netns_available()}")
@pytest.mark.setting("heartbeat_timeout")
def test_a_cut_link_between_hosts_restarts_the_group_with_nothing_lost_or_hung(
        tiny_cache, reference, tmp_path):
    """Two workers on their own network stacks; worker 1's link goes down after the first
    checkpoint and comes back 10 s later: with --heartbeat_timeout 3 (the default is 30) both
    workers notice within seconds and exit, none hangs, the restart resumes from the latest
    checkpoint, and the weights equal the uninterrupted run's."""
    with faults.Network(2, name=f"dct{os.getpid() % 1000}") as net:
        record = faults.one_run("link_down", net, tiny_cache[1], str(tmp_path),
                                interval_s=2.0, extra_flags=["--heartbeat_timeout=3"],
                                link_down_s=10)
    assert record["exit_status"] == 0, record
    assert not record["hung"] and record["group_gone_s"] is not None, record
    assert record["noticed_s"] < 8, record  # 3 s: neither our default 30 s nor TF's 10 s
    assert record["restarts"] >= 1, record
    # The latest checkpoint when the group was gone: one written after the fault (its step's
    # all-reduce had finished; saving needs no peer) counts, none is skipped.
    assert record["resumed_from"] == record["latest_checkpoint_at_exit"], record
    assert record["resumed_from"] >= record["latest_checkpoint_at_fault"], record
    final = faults.launching.latest_checkpoint(record["model_dir"])
    assert final[1] == reference[1]
    assert faults.equal_weights(final[0], reference[0])


def _cluster(n: int, *args: str) -> list[subprocess.Popen]:
    """`tests/timeout_worker.py args` as `n` local workers."""
    ports = faults.launching.free_ports(n)
    procs = []
    for i in range(n):
        env = faults.launching.worker_env(os.environ, cluster.local_tf_config(ports, i), None,
                                       [])
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "timeout_worker.py"), *args], cwd=ROOT,
            env={**env, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    return procs


@pytest.mark.setting("collective_timeout")
def test_collective_timeout_fails_a_collective_that_waits_too_long():
    """--collective_timeout 2 with a peer 15 s late: the first worker's all-reduce fails with
    DeadlineExceeded; with no limit (0, the default) the same all-reduce completes."""
    limited = _cluster(2, "--collective", "2", "--late", "15")
    out0, _ = limited[0].communicate(timeout=120)
    limited[1].kill()
    limited[1].communicate()
    assert limited[0].returncode != 0 and "DeadlineExceeded" in out0, out0[-2000:]
    unlimited = _cluster(2, "--late", "5")
    outs = [p.communicate(timeout=120)[0] for p in unlimited]
    assert all(p.returncode == 0 for p in unlimited), outs[0][-2000:] + outs[1][-2000:]
    assert all("sum 2" in o for o in outs)
