"""The launcher: TF_CONFIG, output, failures, signals, start-up timeout, pod mode, preparation.

Most tests run `python -m dist_caption.launch` over `tests/fake_worker.py` (no TensorFlow, starts
in milliseconds); one slow test runs two real TensorFlow workers through an all-reduce.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_one_line_error
from dist_caption import cluster, launching
from dist_caption.errors import UserError

TESTS = os.path.join(ROOT, "tests")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": TESTS, **extra}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dist_caption.launch", "--no_prepare", "--module",
            "fake_worker", *args]


def run_launch(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
    """The launcher over fake workers, to the end; `env` is added to its environment."""
    return subprocess.run(_command(*args), cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def worker_reports(stdout: str) -> dict[int, dict]:
    """Worker index -> what fake_worker printed about itself (pid, TF_CONFIG, env, argv)."""
    reports = {}
    for m in re.finditer(r"^\[w(\d+)\] worker (\d+) pid (\d+) (.*)$", stdout, re.M):
        reports[int(m[1])] = {"index": int(m[2]), "pid": int(m[3]), **json.loads(m[4])}
    return reports


def all_pids(stdout: str) -> list[int]:
    """Every worker and grandchild pid the fake workers printed."""
    return [int(p) for p in re.findall(r"^\[w\d+\] (?:worker \d+|grandchild) pid (\d+)",
                                       stdout, re.M)]


def alive(pid: int) -> bool:
    """Running, not a zombie (PID 1 in a container may never reap killed orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(path: str, pattern: str, count: int, timeout: float = 20) -> str:
    """The file's text once `pattern` occurs `count` times in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            text = f.read()
        if len(re.findall(pattern, text, re.M)) >= count:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not seen {count} times in {timeout} s:\n{text}")


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------

def test_local_tf_config_same_cluster_own_index():
    ports = launching.free_ports(3)
    assert len(set(ports)) == 3
    configs = [cluster.local_tf_config(ports, i) for i in range(3)]
    assert all(c["cluster"] == {"worker": [f"localhost:{p}" for p in ports]} for c in configs)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]


@pytest.mark.parametrize("index", [0, 3])
def test_pod_tf_config_default_pattern(index):
    env = {"JOB_COMPLETION_INDEX": str(index), "DIST_CAPTION_WORKERS": "4",
           "DIST_CAPTION_JOB_NAME": "caption-train", "DIST_CAPTION_SERVICE": "caption-workers"}
    assert cluster.pod_tf_config(env) == {
        "cluster": {"worker": [f"caption-train-{i}.caption-workers:2222" for i in range(4)]},
        "task": {"type": "worker", "index": index}}


def test_pod_tf_config_custom_pattern_and_port():
    env = {"JOB_COMPLETION_INDEX": "1", "DIST_CAPTION_WORKERS": "2", "DIST_CAPTION_PORT": "5000",
           "DIST_CAPTION_WORKER_HOST_PATTERN": "w{index}.svc.ns:{port}"}
    assert cluster.pod_tf_config(env)["cluster"]["worker"] == ["w0.svc.ns:5000", "w1.svc.ns:5000"]


@pytest.mark.parametrize("env, needle", [
    ({"DIST_CAPTION_WORKERS": "4"}, "JOB_COMPLETION_INDEX is not set"),
    ({"JOB_COMPLETION_INDEX": "0"}, "DIST_CAPTION_WORKERS is not set"),
    ({"JOB_COMPLETION_INDEX": "x", "DIST_CAPTION_WORKERS": "4"}, "JOB_COMPLETION_INDEX='x'"),
    ({"JOB_COMPLETION_INDEX": "0", "DIST_CAPTION_WORKERS": "0"}, "DIST_CAPTION_WORKERS='0'"),
    ({"JOB_COMPLETION_INDEX": "4", "DIST_CAPTION_WORKERS": "4"}, "is not below"),
    ({"JOB_COMPLETION_INDEX": "0", "DIST_CAPTION_WORKERS": "4", "DIST_CAPTION_JOB_NAME": "j"},
     "DIST_CAPTION_SERVICE is not set"),
    ({"JOB_COMPLETION_INDEX": "0", "DIST_CAPTION_WORKERS": "4",
      "DIST_CAPTION_WORKER_HOST_PATTERN": "host:{port}"}, "must contain {index}"),
    ({"JOB_COMPLETION_INDEX": "0", "DIST_CAPTION_WORKERS": "4",
      "DIST_CAPTION_WORKER_HOST_PATTERN": "w{index}", "DIST_CAPTION_PORT": "http"},
     "DIST_CAPTION_PORT='http'"),
])
def test_pod_tf_config_rejects_bad_environment(env, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        cluster.pod_tf_config(env)


def test_worker_env():
    base = {"no_proxy": "corp.example", "TF_CONFIG": "stale", "TF_CPP_MIN_LOG_LEVEL": "0"}
    env = launching.worker_env(base, None, "/r/ready-0", gpus=None)
    assert "TF_CONFIG" not in env and "CUDA_VISIBLE_DEVICES" not in env
    assert env["no_proxy"] == "corp.example,localhost,127.0.0.1"
    assert env["NO_PROXY"] == "localhost,127.0.0.1"
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "0" and env["DIST_CAPTION_READY_FILE"] == "/r/ready-0"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert env["TF_GPU_THREAD_MODE"] == "gpu_private"
    config = {"cluster": {"worker": ["a-0.svc:2222", "a-1.svc:2222"]}, "task": {}}
    env = launching.worker_env({}, config, None, gpus=[])
    assert json.loads(env["TF_CONFIG"]) == config and env["CUDA_VISIBLE_DEVICES"] == "-1"
    assert env["no_proxy"] == "localhost,127.0.0.1,a-0.svc,a-1.svc"
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2" and "DIST_CAPTION_READY_FILE" not in env
    env = launching.worker_env({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "TF_GPU_THREAD_MODE": "global"},
                            None, None, gpus=["2", "3"])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["TF_GPU_THREAD_MODE"] == "global"


NVIDIA_SMI_L = """\
GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-1c2f8f1e-59a3-1d4c-8a32-2c3b4d5e6f70)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-9d0e1f2a-3b4c-5d6e-7f80-91a2b3c4d5e6)
  MIG 3g.40gb     Device  0: (UUID: MIG-4a5b6c7d-8e9f-5a1b-2c3d-4e5f6a7b8c9d)
GPU 2: Tesla T4
"""


def test_host_gpus_from_cuda_visible_devices_else_nvidia_smi():
    listing = lambda: NVIDIA_SMI_L  # noqa: E731
    assert launching.host_gpus({}, listing) == [
        "GPU-1c2f8f1e-59a3-1d4c-8a32-2c3b4d5e6f70", "GPU-9d0e1f2a-3b4c-5d6e-7f80-91a2b3c4d5e6",
        "2"]
    assert launching.host_gpus({}, lambda: "") == []
    # The launcher's own CUDA_VISIBLE_DEVICES is the user's choice of GPUs: it wins.
    assert launching.host_gpus({"CUDA_VISIBLE_DEVICES": "3, 1"}, listing) == ["3", "1"]
    assert launching.host_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, listing) == []
    assert launching.host_gpus({"CUDA_VISIBLE_DEVICES": ""}, listing) == []
    assert launching.host_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,2"}, listing) == ["0"]


@pytest.mark.parametrize("gpus, workers, per_worker, want", [
    (8, 4, None, [[0, 1], [2, 3], [4, 5], [6, 7]]),
    (4, 1, None, [[0, 1, 2, 3]]),
    (4, 4, 1, [[0], [1], [2], [3]]),
    (4, 3, 1, [[0], [1], [2]]),
    (0, 2, None, [[], []]),
])
def test_split_gpus_gives_disjoint_slices(gpus, workers, per_worker, want):
    names = [f"GPU-{i}" for i in range(gpus)]
    assert launching.split_gpus(names, workers, per_worker) == [
        [names[i] for i in s] for s in want]


@pytest.mark.parametrize("gpus, workers, per_worker, needle", [
    (4, 3, None, "4 GPUs do not split evenly over 3 workers: use --workers 1 or 2 or 4, or "
                 "--gpus_per_worker 1 (leaves 1 unused)"),
    (2, 4, None, "2 GPUs do not split evenly over 4 workers: use --workers 1 or 2"),
    (4, 2, 3, "--gpus_per_worker 3 x 2 workers needs 6 GPUs and this host has 4"),
    (0, 1, 1, "needs 1 GPUs and this host has 0 (CUDA_VISIBLE_DEVICES names none, or "
              "nvidia-smi -L lists none)"),
])
def test_split_gpus_rejects_impossible_splits(gpus, workers, per_worker, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        launching.split_gpus([str(i) for i in range(gpus)], workers, per_worker)


def test_prepare_command():
    extract = [sys.executable, "-m", "dist_caption.extract_features"]
    train = ["--batch_size", "8", "--num_images", "40", "--synthetic_seed=3", "--seed=5",
             "--overwrite", "--epochs", "2"]
    assert launching.prepare_command(train, force=False) == [
        *extract, "--num_images=40", "--synthetic_seed=3", "--overwrite"]
    real = ["--dataset", "karpathy", "--karpathy_json", "k.json", "--image_dir", "img",
            "--captions_json", "a.json", "--captions_json=b.json", "--steps", "9"]
    assert launching.prepare_command(real, force=False) == [
        *extract, "--dataset=karpathy", "--karpathy_json=k.json", "--image_dir=img",
        "--captions_json=a.json", "--captions_json=b.json"]
    conceptual = ["--dataset=conceptual", "--cc_train_tsv", "t.tsv", "--cc_val_tsv=v.tsv",
                  "--cc_image_names", "row", "--max_images", "6000", "--min_caption_words=5",
                  "--image_dir=img", "--epochs=1"]
    assert launching.prepare_command(conceptual, force=False) == [
        *extract, "--dataset=conceptual", "--cc_train_tsv=t.tsv", "--cc_val_tsv=v.tsv",
        "--cc_image_names=row", "--max_images=6000", "--min_caption_words=5", "--image_dir=img"]
    assert launching.prepare_command(real + ["--cache_dir=c"], force=False) is None
    assert launching.prepare_command(["--cache_dir", "c"], force=False) is None
    assert launching.prepare_command(["--cache_dir", "c"], force=True) == [
        *extract, "--cache_dir=c"]
    assert launching.prepare_command(["--dataset=synthetic"], force=False) == [
        *extract, "--dataset=synthetic"]


# Run in a fresh process: its absl FLAGS are the extraction's alone, and it shows what loaded.
_EXTRACT_FLAGS = """
import json, sys
from absl import flags
from dist_caption import flags as dc_flags, launching
before = set(flags.FLAGS)
dc_flags.define_extract_flags()
flags.FLAGS(["extract_features", "--shard_size=8"])
print(json.dumps({"flags": sorted(set(flags.FLAGS) - before),
                  "tensorflow": "tensorflow" in sys.modules,
                  "passed_on": sorted(launching.EXTRACTION_FLAGS),
                  "passed_on_bool": sorted(launching.EXTRACTION_BOOL_FLAGS)}))
"""


def test_data_preparation_gets_every_flag_of_extract_features_but_a_tasks_share():
    """The launcher's list of what to pass on to extract_features is derived from the
    declarations: every dataset, extraction and cache flag, not the task flags (the launcher
    sets those). Parsing those flags loads no TensorFlow."""
    out = subprocess.run([sys.executable, "-c", _EXTRACT_FLAGS], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout)
    assert not found["tensorflow"]
    task = {"task_index", "num_tasks", "extract_wait_timeout"}
    assert found["passed_on_bool"] == ["nooverwrite", "overwrite"]
    assert set(found["passed_on"]) | {"overwrite"} == set(found["flags"]) - task
    assert {"dataset", "captions_json", "backbone", "weights", "cache_dir", "vocab_size",
            "max_images", "min_caption_words"} <= set(found["passed_on"])
    # The command itself refuses a bad flag before it loads TensorFlow: one line, none of
    # TensorFlow's start-up notices.
    for module in ("dist_caption.extract_features", "dist_caption.evaluate"):
        flag = ["--limit=-1", f"--model_dir={ROOT}"] if "eval" in module else ["--shard_size=-1"]
        bad = subprocess.run([sys.executable, "-m", module, *flag], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
        assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, bad.stderr


@pytest.mark.setting("prepare")
@pytest.mark.slow
def test_the_data_preparation_of_n_workers_is_n_extraction_tasks(tmp_path):
    """launch --workers 2 --prepare: two extract_features processes share the shards, both
    done (the manifest written) before the workers start."""
    cache_dir, synthetic_dir = tmp_path / "cache", tmp_path / "synthetic"
    result = subprocess.run(
        [sys.executable, "-m", "dist_caption.launch", "--workers", "2", "--cpu", "--prepare",
         "--log_dir", str(tmp_path / "logs"), "--module", "fake_worker", "--modes", "ok",
         f"--cache_dir={cache_dir}", f"--synthetic_dir={synthetic_dir}", "--num_images=24",
         "--image_size=64", "--shard_size=4"],
        cwd=ROOT, env=_env(CUDA_VISIBLE_DEVICES="-1"), capture_output=True, text=True,
        timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for i in range(2):
        assert re.search(rf"^\[prep{i}\] feature cache .* \(task {i} of 2\)$", result.stdout,
                         re.M), result.stdout[-3000:]
        assert (tmp_path / "logs" / f"prepare-{i}.log").exists()
    assert (cache_dir / "manifest.json").exists()
    last_prep = max(m.start() for m in re.finditer(r"^\[prep\d\]", result.stdout, re.M))
    assert min(m.start() for m in re.finditer(r"^\[w\d\]", result.stdout, re.M)) > last_prep
    assert launching.prepare_tasks(["x"], 1, {}, None)[0].command == ["x"]


def test_a_run_on_an_object_store_keeps_worker_logs_only_where_log_dir_says():
    url = "ram://bucket-launch-test/run"
    result = run_launch("--workers", "2", "--modes", "ok", f"--model_dir={url}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker-logs" not in result.stdout
    assert not os.path.exists(os.path.join(ROOT, "ram:")), "a folder named after the URL"


# ------------------------------------------------------------------------------------------------
# Local runs over fake workers
# ------------------------------------------------------------------------------------------------

@pytest.mark.setting("workers", "log_dir")
def test_all_workers_ok_prefixed_output_tf_config_and_logs(tmp_path):
    train_flags = ["--modes", "ok", "--batch_size", "8", "--name=x y"]
    result = run_launch("--workers", "3", "--cpu", "--log_dir", str(tmp_path), *train_flags)
    assert result.returncode == 0, result.stdout + result.stderr
    reports = worker_reports(result.stdout)
    assert sorted(reports) == [0, 1, 2]
    cluster = reports[0]["tf_config"]["cluster"]
    assert len(set(cluster["worker"])) == 3
    for i, report in reports.items():
        assert report["index"] == i
        assert report["tf_config"] == {"cluster": cluster, "task": {"type": "worker", "index": i}}
        assert report["argv"] == train_flags
        assert report["env"]["CUDA_VISIBLE_DEVICES"] == "-1"
        assert report["env"]["DIST_CAPTION_READY_FILE"].endswith(f"ready-{i}")
        assert f"[w{i}] ready" in result.stdout.splitlines()
        with open(tmp_path / f"worker-{i}.log") as f:
            assert f.read().splitlines()[1:] == ["ready"]


def test_single_worker_runs_without_tf_config():
    result = run_launch("--modes", "ok", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stdout + result.stderr
    report = worker_reports(result.stdout)[0]
    assert report["tf_config"] is None and report["env"]["DIST_CAPTION_READY_FILE"]
    assert report["env"]["CUDA_VISIBLE_DEVICES"] == ""  # no GPU on the host: left as it was
    assert "launch: GPUs" not in result.stdout


@pytest.mark.parametrize("host, args, want", [
    ("0,1,2,3", ["--workers", "4"], ["0", "1", "2", "3"]),
    ("0,1,2,3", ["--workers", "2"], ["0,1", "2,3"]),
    ("4,5,6,7", ["--workers", "2", "--gpus_per_worker", "1"], ["4", "5"]),
    ("0,1,2,3", ["--workers", "1"], ["0,1,2,3"]),
    ("0,1,2,3", ["--workers", "2", "--cpu"], ["-1", "-1"]),
])
@pytest.mark.setting("gpus_per_worker", "cpu")
def test_each_worker_sees_its_own_gpus(host, args, want):
    """The host's GPUs (the launcher's CUDA_VISIBLE_DEVICES) are split into disjoint slices,
    one per worker, each worker's memory growing as needed."""
    result = run_launch(*args, "--modes", "ok", CUDA_VISIBLE_DEVICES=host)
    assert result.returncode == 0, result.stdout + result.stderr
    reports = worker_reports(result.stdout)
    assert [reports[i]["env"]["CUDA_VISIBLE_DEVICES"] for i in sorted(reports)] == want
    assert all(r["env"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" for r in reports.values())
    if "--cpu" not in args:
        unused = len(host.split(",")) - sum(len(w.split(",")) for w in want)
        assert ("launch: GPUs: " + "; ".join(f"worker {i} {w}" for i, w in enumerate(want))
                + (f" ({unused} left unused)" if unused else "")) in result.stdout.splitlines()


@pytest.mark.parametrize("host, args, needle", [
    ("0,1,2,3", ["--workers", "3"], "4 GPUs do not split evenly over 3 workers"),
    ("0,1", ["--workers", "2", "--gpus_per_worker", "2"],
     "--gpus_per_worker 2 x 2 workers needs 4 GPUs and this host has 2 (0, 1)"),
    ("-1", ["--gpus_per_worker", "1"], "needs 1 GPUs and this host has 0"),
    ("0,1", ["--gpus_per_worker", "0"],
     "--gpus_per_worker must be at least 1 (use --cpu to train without GPUs), got 0"),
    ("0,1", ["--cpu", "--gpus_per_worker", "1"], "--cpu hides every GPU"),
    ("0,1", ["--pod", "--gpus_per_worker", "1"], "--gpus_per_worker is for local workers"),
])
def test_impossible_gpu_split_exits_2_with_one_line_before_any_worker(host, args, needle):
    result = run_launch(*args, "--modes", "ok", CUDA_VISIBLE_DEVICES=host)
    assert_one_line_error(result, needle)
    assert "[w0]" not in result.stdout


@pytest.mark.alone
@pytest.mark.parametrize("how, code, described", [
    ("fail", 1, "exit code 1"),
    ("kill", 128 + 9, "signal SIGKILL (out of memory, or killed from outside)")])
@pytest.mark.setting("failure_grace_seconds", "module", "no_prepare")
def test_failing_worker_stops_the_others(how, code, described):
    """One worker fails: the others get SIGTERM, a stubborn one SIGKILL after the grace
    period, and no worker or grandchild survives."""
    start = time.monotonic()
    result = run_launch("--workers", "3", "--failure_grace_seconds", "1", "--max_restarts", "0",
                        "--modes", f"wait,{how},stubborn", "--delay", "0.5", "--grandchild")
    elapsed = time.monotonic() - start
    assert result.returncode == code, result.stdout + result.stderr
    lines = [l for l in result.stdout.splitlines() if l.startswith("launch: worker")]
    assert lines == [f"launch: worker 1 exited with {described}; stopping the others"]
    assert result.stdout.splitlines()[-1] == (
        "launch: no restarts left (--max_restarts 0); no checkpoint was written; start again "
        "with: launch/train.sh --no_prepare --module fake_worker --workers 3 "
        "--failure_grace_seconds 1 --max_restarts 0 --modes " + f"wait,{how},stubborn --delay "
        "0.5 --grandchild")
    assert "[w0] checkpointed" in result.stdout
    assert elapsed < 0.5 + 1 + 3, elapsed
    pids = all_pids(result.stdout)
    assert len(pids) == 6 and not [p for p in pids if alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_and_preemption_code_returned(tmp_path, sig):
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen(_command("--workers", "3", "--modes", "wait"), cwd=ROOT,
                                env=_env(), stdout=f, stderr=subprocess.STDOUT)
    wait_for(out, r"^\[w\d\] ready$", 3)
    proc.send_signal(sig)
    assert proc.wait(timeout=10) == cluster.PREEMPTED
    text = out.read_text()
    assert sorted(re.findall(r"^\[w(\d)\] checkpointed$", text, re.M)) == ["0", "1", "2"]
    assert not [p for p in all_pids(text) if alive(p)]


@pytest.mark.alone
@pytest.mark.parametrize("grace, signals, seconds", [(1, 1, (1, 3)), (60, 2, (0, 2))])
@pytest.mark.setting("grace_seconds")
def test_worker_ignoring_sigterm_is_killed_after_grace_or_second_signal(tmp_path, grace,
                                                                         signals, seconds):
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen(_command("--workers", "2", "--grace_seconds", str(grace),
                                         "--modes", "wait,stubborn"),
                                cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    wait_for(out, r"^\[w\d\] ready$", 2)
    start = time.monotonic()
    for _ in range(signals):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    assert proc.wait(timeout=10) == 128 + signal.SIGKILL
    assert seconds[0] <= time.monotonic() - start < seconds[1]
    assert not [p for p in all_pids(out.read_text()) if alive(p)]


@pytest.mark.alone
@pytest.mark.setting("startup_timeout")
def test_startup_timeout_stops_everything_with_exit_3():
    start = time.monotonic()
    result = run_launch("--workers", "4", "--startup_timeout", "2", "--failure_grace_seconds",
                        "1", "--max_restarts", "0", "--modes", "wait,ok,late")
    elapsed = time.monotonic() - start
    assert result.returncode == launching.STARTUP_TIMEOUT_EXIT, result.stdout + result.stderr
    lines = [l for l in result.stdout.splitlines() if l.startswith("launch: worker")]
    assert lines == ["launch: worker(s) 2,3 did not join within 2 s; stopping"]
    assert 2 <= elapsed < 2 + 3, elapsed
    assert not [p for p in all_pids(result.stdout) if alive(p)]


def _launch_lines(stdout: str) -> list[str]:
    return [l for l in stdout.splitlines() if l.startswith("launch: ")
            and not l.startswith(("launch: every line", "launch: 3 x", "launch: 2 x"))]


def test_a_failed_worker_restarts_the_whole_group_from_the_last_checkpoint(tmp_path):
    """Worker 1 is SIGKILLed in its first launch and its peers lose it (exit 43): every worker
    starts again, the run ends 0, and the console says in one line each what failed, and the
    restart with the step it resumes from; the peers' tracebacks are in their logs only."""
    model_dir = tmp_path / "run"
    (model_dir / "checkpoints").mkdir(parents=True)
    (model_dir / "checkpoints" / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-40"\nall_model_checkpoint_paths: "ckpt-20"\n'
        'all_model_checkpoint_paths: "ckpt-40"\n')
    result = run_launch("--workers", "3", "--max_restarts", "2", "--failure_grace_seconds", "3",
                        "--modes", "lost,kill,lost", "--fail_times", "1", "--state_dir",
                        str(tmp_path), f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _launch_lines(result.stdout) == [
        "launch: worker 1 exited with signal SIGKILL (out of memory, or killed from outside); "
        "stopping the others",
        f"launch: restart 1 of 2: every worker again, resuming from step 40 "
        f"({model_dir / 'checkpoints' / 'ckpt-40'})"]
    assert len(re.findall(r"^\[w\d\] worker \d pid", result.stdout, re.M)) == 6
    assert "Traceback" not in result.stdout and "peer lost" not in result.stdout
    log = (model_dir / "worker-logs" / "worker-0.log").read_text()
    assert "peer lost: UnavailableError" in log and "Traceback" in log
    assert "launch: ---- restart 1 ----" in log


def test_a_peer_that_lost_the_group_is_named_when_no_other_failed(tmp_path):
    """Only exit 43 (a cut link, a stall noticed by the chief): that worker is named, with the
    meaning of its code, and the group restarts."""
    result = run_launch("--workers", "2", "--max_restarts", "1", "--failure_grace_seconds", "1",
                        "--modes", "lost,ok", "--delay", "0.1", "--fail_times", "1",
                        "--state_dir", str(tmp_path), f"--model_dir={tmp_path / 'run'}")
    assert _launch_lines(result.stdout)[:2] == [
        "launch: worker 0 exited with exit code 43 (it lost a peer); stopping the others",
        "launch: restart 1 of 1: every worker again, resuming from the start (no checkpoint "
        "yet)"]


@pytest.mark.setting("max_restarts")
def test_when_the_restarts_are_used_up_the_run_stops_with_the_resume_command(tmp_path):
    args = ["--workers", "2", "--max_restarts", "2", "--failure_grace_seconds", "1", "--modes",
            "ok,fail", "--delay", "0.1", f"--model_dir={tmp_path / 'run'}"]
    result = run_launch(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert _launch_lines(result.stdout) == [
        "launch: worker 1 exited with exit code 1; stopping the others",
        "launch: restart 1 of 2: every worker again, resuming from the start (no checkpoint "
        "yet)",
        "launch: worker 1 exited with exit code 1; stopping the others",
        "launch: restart 2 of 2: every worker again, resuming from the start (no checkpoint "
        "yet)",
        "launch: worker 1 exited with exit code 1; stopping the others",
        "launch: no restarts left (--max_restarts 2); no checkpoint was written; start again "
        "with: launch/train.sh " + " ".join(_command(*args)[3:])]


def test_what_the_others_print_after_a_failure_goes_to_their_logs_only(tmp_path):
    model_dir = tmp_path / "run"
    result = run_launch("--workers", "2", "--max_restarts", "0", "--failure_grace_seconds", "1",
                        "--modes", "wait,fail", "--delay", "0.1", f"--model_dir={model_dir}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "checkpointed" not in result.stdout
    assert "checkpointed" in (model_dir / "worker-logs" / "worker-0.log").read_text()


def test_bad_flags_are_not_restarted():
    result = run_launch("--workers", "2", "--max_restarts", "3", "--modes", "ok,usage")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "restart" not in result.stdout
    assert "[w1] error: flag --units=-1" in result.stdout


@pytest.mark.parametrize("args, needle", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "two"], "--workers: invalid int value"),
    (["--startup_timeout", "-5"], "--startup_timeout must be a positive"),
    (["--grace_seconds", "-1"], "--grace_seconds must not be negative"),
    (["--max_restarts", "-1"], "--max_restarts must not be negative"),
    (["--prepare", "--no_prepare"], "--prepare and --no_prepare contradict each other"),
])
def test_bad_launcher_options_exit_2_with_one_line(args, needle):
    assert_one_line_error(run_launch(*args), needle)


def test_failed_data_preparation_fails_the_launch():
    """Default synthetic data and no --cache_dir: extract_features runs first (as 2 tasks); a
    flag error stops the launch with its exit code before any worker starts."""
    result = subprocess.run(
        [sys.executable, "-m", "dist_caption.launch", "--module", "fake_worker", "--workers",
         "2", "--vocab_size", "3", "--batch_size", "4"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "launch: preparing the data: -m dist_caption.extract_features --vocab_size=3 (split " \
        "over 2 processes)\n" in result.stdout
    assert re.search(r"^\[prep[01]\] error: flag --vocab_size=3", result.stdout, re.M)
    assert re.search(r"^launch: data preparation [01] exited with exit code 2", result.stdout,
                     re.M)
    assert "[w0]" not in result.stdout


@pytest.mark.parametrize("args, needle", [
    (["--objective", "scst"], "--objective scst starts from a trained model: pass --init_from"),
    (["--objective=scst", "--init_from=runs/x", "--scst_samples=1"],
     "--scst_baseline mean needs --scst_samples of at least 2"),
    (["--global_batch_size=21"], "--global_batch_size 21 does not split over 2 replicas"),
    (["--captions_per_image", "3"], "--captions_per_image 3 does not divide the 32 captions"),
    (["--units=10", "--num_heads=3"], "num_heads must divide units"),
    (["--epochs=0"], "epochs must be a positive number"),
    (["--units=wide"], "--units must be an integer, got 'wide'"),
])
def test_training_flags_that_cannot_work_stop_the_launch_before_any_data_is_prepared(
        args, needle, tmp_path):
    """The flags alone decide these (with the worker count): one line, exit 2, and neither
    data preparation nor a worker started (no --cache_dir, so the launch would prepare)."""
    result = subprocess.run(
        [sys.executable, "-m", "dist_caption.launch", "--workers", "2", "--cpu",
         f"--synthetic_dir={tmp_path / 'synthetic'}", *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, needle)
    assert "preparing the data" not in result.stdout and "[w0]" not in result.stdout
    assert not os.path.exists(tmp_path / "synthetic")


def test_scst_with_the_default_batch_passes_the_launchers_checks_on_1_2_and_4_workers():
    """64 images a step, 5 samples each: splits over 1, 2 and 4 workers (it once had to be
    divided into 5-caption groups per replica, which 32 and 16 are not)."""
    for workers in (1, 2, 4):
        launching.check_training_args(["--objective=scst", "--init_from=runs/x"], workers)
    with pytest.raises(UserError, match="does not split over 3 replicas"):
        launching.check_training_args(["--objective=scst", "--init_from=runs/x"], 3)


# ------------------------------------------------------------------------------------------------
# Pod mode
# ------------------------------------------------------------------------------------------------

@pytest.mark.setting("launch:pod")
def test_pod_mode_becomes_the_worker_with_tf_config_from_env():
    env = _env(JOB_COMPLETION_INDEX="3", DIST_CAPTION_WORKERS="4",
               DIST_CAPTION_JOB_NAME="caption-train", DIST_CAPTION_SERVICE="workers",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.Popen(
        [os.path.join(ROOT, "launch", "pod_entrypoint.sh"), "--module", "fake_worker", "--cpu",
         "--modes", "ok", "--steps", "5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout + stderr
    m = re.match(r"worker 3 pid (\d+) (.*)", stdout)
    report = json.loads(m[2])
    assert int(m[1]) == proc.pid, "the launcher must exec the worker, not wrap it"
    assert report["tf_config"] == {
        "cluster": {"worker": [f"caption-train-{i}.workers:2222" for i in range(4)]},
        "task": {"type": "worker", "index": 3}}
    assert report["argv"] == ["--modes", "ok", "--steps", "5"]
    assert report["env"]["CUDA_VISIBLE_DEVICES"] == "-1"


@pytest.mark.slow
def test_every_pod_extracts_its_share_of_the_cache_then_trains(tmp_path):
    """Two pods of the Indexed Job: each runs extraction task JOB_COMPLETION_INDEX of
    DIST_CAPTION_WORKERS, and becomes its worker once the whole cache is there."""
    cache_dir = tmp_path / "cache"
    procs = [subprocess.Popen(
        [os.path.join(ROOT, "launch", "pod_entrypoint.sh"), "--module", "fake_worker", "--cpu",
         "--modes", "ok"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env(JOB_COMPLETION_INDEX=str(i), DIST_CAPTION_WORKERS="2", DIST_CAPTION_JOB_NAME="j",
                 DIST_CAPTION_SERVICE="s", DIST_CAPTION_CACHE_DIR=str(cache_dir),
                 DIST_CAPTION_DATA_FLAGS=f"--synthetic_dir={tmp_path / 'synthetic'} "
                                         "--num_images=24 --image_size=64 --shard_size=4",
                 CUDA_VISIBLE_DEVICES="-1", TF_NUM_INTRAOP_THREADS="1",
                 PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]))
        for i in range(2)]
    for i, proc in enumerate(procs):
        out = proc.communicate(timeout=180)[0]
        assert proc.returncode == 0, out[-3000:]
        assert re.search(rf"^feature cache .* \(task {i} of 2\)$", out, re.M), out[-3000:]
        report = json.loads(re.search(r"^worker (\d+) pid \d+ (.*)$", out, re.M)[2])
        assert report["argv"][:2] == ["--cache_dir", str(cache_dir)]
    assert (cache_dir / "manifest.json").exists()


def test_exporting_pod_zero_passes_sigterm_on_and_keeps_the_preemption_code(tmp_path):
    """Pod 0 waits to export, so the entrypoint stays the parent: a preemption must still
    reach the worker (it checkpoints and exits 42) and no export starts."""
    env = _env(JOB_COMPLETION_INDEX="0", DIST_CAPTION_WORKERS="1", DIST_CAPTION_JOB_NAME="j",
               DIST_CAPTION_SERVICE="s",
               DIST_CAPTION_EXPORT_BASE=str(tmp_path / "exports"),
               DIST_CAPTION_MODEL_DIR=str(tmp_path / "run"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.Popen(
        [os.path.join(ROOT, "launch", "pod_entrypoint.sh"), "--module", "fake_worker", "--cpu",
         "--modes", "wait"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert proc.stdout.readline().startswith("worker 0 pid ")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 42, stdout + stderr
    assert not os.path.exists(tmp_path / "exports")


def test_pod_mode_bad_environment_exits_2_with_one_line():
    result = subprocess.run([sys.executable, "-m", "dist_caption.launch", "--pod"], cwd=ROOT,
                            env=_env(DIST_CAPTION_WORKERS="2"), capture_output=True, text=True,
                            timeout=30)
    assert_one_line_error(result, "JOB_COMPLETION_INDEX is not set")


# ------------------------------------------------------------------------------------------------
# Real TensorFlow
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_real_tensorflow_workers_all_reduce_through_train_sh():
    """launch/train.sh gives two TensorFlow processes a TF_CONFIG that
    MultiWorkerMirroredStrategy accepts: one all-reduce of 1 + 2 across them."""
    result = subprocess.run(
        [os.path.join(ROOT, "launch", "train.sh"), "--workers", "2", "--cpu", "--no_prepare",
         "--startup_timeout", "60", "--module", "tf_collective_worker"],
        env=_env(), capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for i in range(2):
        assert f"[w{i}] 2 replicas, all-reduced sum 3" in result.stdout.splitlines()


def test_tensorflow_noise_goes_to_the_worker_logs_only(tmp_path):
    model_dir = tmp_path / "run"
    result = run_launch("--workers", "2", "--cpu", "--noise", f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "absl::InitializeLog" not in result.stdout and "cuInit" not in result.stdout
    assert "[w0] W0000 00:00:1.6 9 train.py:1] a real warning" in result.stdout
    assert f"every line of each process in {model_dir / 'worker-logs'}/" in result.stdout
    for i in (0, 1):
        log = (model_dir / "worker-logs" / f"worker-{i}.log").read_text()
        assert "absl::InitializeLog" in log and "cuInit" in log and "a real warning" in log
    # On a worker given GPUs, a CUDA start-up failure is real: it is shown.
    shown = run_launch("--workers", "1", "--noise", f"--model_dir={model_dir}",
                       CUDA_VISIBLE_DEVICES="0")
    assert "failed call to cuInit" in shown.stdout and "absl::InitializeLog" not in shown.stdout

