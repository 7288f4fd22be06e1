"""Benchmarks: the README's tables are the JSON results, and the results have the documented
shape (any script can read the ratios)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def test_readme_tables_agree_with_the_results():
    result = subprocess.run([sys.executable, "benchmarks/readme_table.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, ("docs/performance.md's benchmark section is stale: run "
                                    ".venv/bin/python benchmarks/readme_table.py")


def test_decode_results_have_the_documented_keys():
    with open(os.path.join(RESULTS, "decode.json")) as f:
        decode = json.load(f)
    assert set(decode["batch"]) == {"1", "8", "64"}
    for row in decode["batch"].values():
        for path in ("cached", "cached_xla", "recompute"):
            assert {"captions_per_s", "p50_ms", "p99_ms"} <= set(row[path])
            assert row[path]["p50_ms"] <= row[path]["p99_ms"]
    assert decode["machine"]["matmul_gflops"] > 0


def test_flop_count_matches_a_hand_count_for_a_tiny_decoder():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_model import flops_per_caption

    from dist_caption.model import ModelConfig

    config = ModelConfig(decoder="transformer", vocab_size=10, feature_shape=(1, 2, 3),
                         max_len=4, num_layers=1, units=4, num_heads=2, ff_units=8)
    flops = flops_per_caption(config, tokens=2)
    # grid projection 2*2*3*4 = 48, cross keys/values 2 * 2*2*4*4 = 128
    assert flops["encode"] == 48 + 128
    # q,k,v,out 4*2*16 = 128; cache attention 2*2*4*4 = 64; cross q,out 2*2*16 = 64;
    # cross attention 2*2*2*4 = 32; feed-forward 2*2*4*8 = 128; logits 2*4*10 = 80
    assert flops["per_token"] == 128 + 64 + 64 + 32 + 128 + 80
    assert flops["caption"] == flops["encode"] + 2 * flops["per_token"]


NO_DRIVER = "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the " \
            "NVIDIA driver.'\nexit 9\n"
NO_GPU = "#!/bin/sh\necho 'No devices were found'\nexit 6\n"


@pytest.mark.parametrize("fake_nvidia_smi, visible, why", [
    (NO_DRIVER, None, "nvidia-smi -L lists none, or there is no NVIDIA driver"),
    (NO_GPU, None, "nvidia-smi -L lists none, or there is no NVIDIA driver"),
    (None, "-1", "CUDA_VISIBLE_DEVICES='-1' names none"),
])
def test_gpu_check_without_a_gpu_says_so_in_one_line_and_measures_nothing(
        tmp_path, fake_nvidia_smi, visible, why):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if fake_nvidia_smi:
        (bin_dir / "nvidia-smi").write_text(fake_nvidia_smi)
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env["PATH"]])
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    before = sorted(os.listdir(RESULTS))
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_check.sh")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"gpu_check: no GPU on this machine ({why}): nothing measured"]
    assert sorted(os.listdir(RESULTS)) == before
