"""scripts/bench.py still runs end to end and writes what the README quotes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")


def test_train_quick_writes_positive_numbers(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "train", "--quick", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=30,
    )
    results = json.loads((tmp_path / "train.json").read_text())
    assert (tmp_path / "train.md").read_text().startswith("# Training benchmark")

    for key in ("date", "torch", "cpu", "threads", "command", "config"):
        assert results[key], key
    assert "train --quick" in results["command"]
    assert results["config"]["preset"] == "tiny"
    for precision in PRECISIONS:
        assert results["matmul_peak"][precision]["flops_per_s"] > 0
        assert results["flops_per_step"][precision]["total"] > 0
        train = results["train"][precision]
        for key in ("steps_per_s", "median_step_s", "achieved_flops_per_s", "fraction_of_peak"):
            assert train[key] > 0, (precision, key)
        assert len(train["step_seconds"]) == results["config"]["timed_steps"]
    # attention is counted (torch's counter misses the CPU SDPA kernel unless told)
    assert any("attention" in op for op in results["flops_per_step"]["fp32"]["by_op"])
    for key in ("bf16_speedup", "bf16_speedup_paired_median", "matmul_bf16_speedup"):
        assert results[key] > 0, key


def test_sample_quick_writes_positive_numbers(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "sample", "--quick", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=30,
    )
    results = json.loads((tmp_path / "sample.json").read_text())
    assert (tmp_path / "sample.md").read_text().startswith("# Sampling benchmark")

    for key in ("date", "torch", "cpu", "threads", "command", "scaling"):
        assert results[key], key
    assert "sample --quick" in results["command"] and results["quick"]
    assert set(results["models"]) == {"top", "bottom", "cpu-small"}
    for name, model in results["models"].items():
        assert model["positions"] > 0 and model["parameters"] > 0, name
        for sampler in ("naive", "cached"):
            timing = model[sampler]
            for key in ("seconds_per_position", "total_s"):
                assert timing[key] > 0, (name, sampler, key)
            assert len(timing["runs"]) == results["rounds"]
            for run in timing["runs"]:
                assert 0 < run["timed_positions"] <= model["positions"]
                assert run["scaled"] == (run["timed_positions"] < model["positions"])
                assert run["other_cpu_use"] >= 0
        assert model["naive"]["scaled"]  # the naive sampler is timed on a prefix
        for key in ("speedup", "speedup_paired_median", "per_position_speedup"):
            assert model[key] > 0, (name, key)
        # same seed, same draws: the cached sampler is exact
        assert model["check"]["positions_compared"] > 0 and model["check"]["identical_draws"], name
