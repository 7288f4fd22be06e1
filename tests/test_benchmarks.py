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


def test_the_benchmarks_read_the_quickstarts_recipe_from_the_script(tmp_path):
    """`quickstart_recipe` returns the training settings of the script's first train.sh
    command, typed, without the launcher's options or shell variables; the script's own
    recipe is a valid training config."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from quickstart_recipe import cross_entropy_settings

    from dist_caption.config import TRAIN_RULES, TrainConfig
    from serving import declaring

    script = tmp_path / "quickstart.sh"
    script.write_text('set -e\nbash launch/setup.sh\n'
                      'bash launch/train.sh --workers "${WORKERS:-4}" --model_dir "$dir" \\\n'
                      '  --units 64 --learning_rate 4e-3 --encoder_layers 2 \\\n'
                      '  --early_stopping_metric CIDEr "$@"  # a comment --units 9\n'
                      'bash launch/train.sh --units 32 --objective scst\n')
    assert cross_entropy_settings(str(script)) == {
        "units": 64, "learning_rate": 0.004, "encoder_layers": 2,
        "early_stopping_metric": "CIDEr"}
    script.write_text("bash launch/setup.sh\n")
    with pytest.raises(ValueError, match="no `bash launch/train.sh` command"):
        cross_entropy_settings(str(script))

    recipe = cross_entropy_settings()
    declaring.check(TrainConfig(cache_dir="-", model_dir="-", **recipe), TRAIN_RULES)
    assert {"units", "global_batch_size", "learning_rate", "epochs"} <= set(recipe)
