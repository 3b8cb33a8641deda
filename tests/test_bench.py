"""scripts/bench.py still runs end to end and writes what the README quotes."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import (codecs, evaluate, extract, guidance, lmdb, ood, precision, sample, sample_pipeline, streams, train,
                   vqvae)
from launch import run_in_process
from pipelines.data.datasets import ImageTensorDataset
from pipelines.infer.extract import extract_codes

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")


def run_quick(benchmark, out_dir, heading, *options):
    """Runs `bench.py <benchmark> --quick [options]`, checks the markdown's heading and the
    machine's description in the JSON, and returns the JSON. The timeout leaves room for a
    machine shared with other jobs."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), benchmark, "--quick", "--out", str(out_dir), *options],
        check=True, capture_output=True, text=True, timeout=300,
    )
    results = json.loads((out_dir / f"{benchmark}.json").read_text())
    assert (out_dir / f"{benchmark}.md").read_text().startswith(heading)
    for key in ("date", "torch", "cpu", "threads", "command"):
        assert results[key], key
    assert f"{benchmark} --quick" in results["command"]
    return results


def test_train_quick_writes_positive_numbers(tmp_path):
    results = run_quick("train", tmp_path, "# Training benchmark")
    assert results["config"]["cases"] == train.QUICK_CASES
    for dtype in PRECISIONS:
        assert results["matmul_peak"][dtype]["flops_per_s"] > 0
    for name, case in results["cases"].items():
        assert case["flops_per_step"]["total"] > 0 and case["parameters"] > 0, name
        assert set(case["train"]) == {"fp32", "bf16"}, name
        for variant, timing in case["train"].items():
            for key in ("steps_per_s", "median_step_s", "achieved_flops_per_s", "fraction_of_bf16_peak"):
                assert timing[key] > 0, (name, variant, key)
            assert len(timing["step_seconds"]) == results["config"]["timed_steps"]
        assert case["train"]["bf16"]["speedup_vs_fp32"] > 0
    # attention is counted (torch's counter misses the CPU SDPA kernel unless told)
    assert any("attention" in op for op in results["cases"]["tiny"]["flops_per_step"]["by_op"])


def test_sample_quick_writes_positive_numbers(tmp_path):
    results = run_quick("sample", tmp_path, "# Sampling benchmark")
    assert results["scaling"] and results["quick"]
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


def test_sample_pipeline_quick_counts_flops_and_weight_bytes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "sample", "--pipeline", "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "sample-pipeline.json").read_text())
    assert (tmp_path / "sample-pipeline.md").read_text() == sample_pipeline.REPORT.markdown(results)
    assert results["matmul_peak"]["bf16"]["flops_per_s"] > 0 and min(results["memory_bandwidth"].values()) > 0
    assert set(results["levels"]) == {"top", "bottom"} and results["precisions"] == ["fp32", "bf16"]
    for name, level in results["levels"].items():
        # one row and the next row's first position: a row start is inside the timed steps
        assert level["timed_positions"] == level["positions"] ** 0.5 + 1, name
        assert level["flops_per_position"] > 0 and level["weight_bytes_per_position"] > 0, name
        for dtype in results["precisions"]:
            assert level["seconds_per_position"][dtype] > 0 and level["total_s"][dtype] > 0, name
            assert results["decode"][dtype] > 0


def test_committed_pipeline_markdown_is_made_from_committed_json():
    for name in ("sample-pipeline", "sample-pipeline-before", "sample-pipeline-cast-once"):
        results = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
        assert sample_pipeline.REPORT.markdown(results) == (ROOT / "bench" / "results" / f"{name}.md").read_text()


def test_vqvae_quick_writes_positive_numbers(tmp_path):
    results = run_quick("vqvae", tmp_path, "# VQ-VAE-2 benchmark")
    assert results["quick"]
    config = results["config"]
    assert config["image_size"] == 32 and config["parameters"] > 0 and not config["paper_model"]
    variants = ["fp32", "bf16", "bf16_channels_last"]
    assert list(config["variants"]) == variants
    assert config["variants"]["bf16_channels_last"] == {"precision": "bf16", "channels_last": True}
    for phase, calls in (("train", config["timed_steps"]), ("extract", config["extract_timed_batches"])):
        assert list(results[phase]) == variants, phase
        for name, timing in results[phase].items():
            for key in ("images_per_s", "median_s", "min_s", "max_s"):
                assert timing[key] > 0, (phase, name, key)
            assert len(timing["seconds"]) == len(timing["other_cpu_use"]) == calls
            assert all(v >= 0 for v in timing["other_cpu_use"])
            if name != "fp32":
                assert timing["speedup_vs_fp32"] > 0 and timing["speedup_vs_fp32_paired_median"] > 0, (phase, name)
        assert results[phase]["bf16_channels_last"]["speedup_vs_bf16"] > 0, phase
    for name, timing in results["extract"].items():
        agreement = timing["codes_equal_to_fp32"]
        assert set(agreement) == {"top", "bottom"} and all(0 <= v <= 1 for v in agreement.values()), name
    assert results["extract"]["fp32"]["codes_equal_to_fp32"] == {"top": 1.0, "bottom": 1.0}


def test_lmdb_quick_writes_positive_numbers(tmp_path):
    results = run_quick("lmdb", tmp_path, "# LMDB code database benchmark")
    assert results["quick"]
    config, build = results["config"], results["build"]
    assert config["record_bytes"] == 4 + 2 * (4 * 4 + 8 * 8)
    assert build["records_per_s"] > 0 and build["database_bytes"] >= config["records"] * config["record_bytes"]
    assert list(results["read"]) == ["main process", "fork, 2 workers", "spawn, 2 workers"]
    for name, variant in results["read"].items():
        assert (variant["workers"], variant["context"]) == ((0, None) if name == "main process" else (2, name.split(",")[0]))
        for key in ("records_per_s", "speedup_vs_main_process"):
            assert variant[key] > 0, (name, key)
        assert len(variant["runs"]) == config["rounds"]
        assert variant["records_read"] == sum(run["records"] for run in variant["runs"]) > 0
        assert all(run["startup_s"] > 0 and run["other_cpu_use"] >= 0 for run in variant["runs"])


def test_streams_quick_trains_one_and_two_streams_on_a_code_database(tmp_path):
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plan = dict(top_shape=(2, 2), bottom_shape=(4, 4), top_codes=5, bottom_codes=7, n_classes=3,
                vqvae_sha256="ab" * 32, image_size=8, source={"data": "random", "split": "train"})

    def encode(batch):
        return batch[:, 0, ::4, ::4].long() % 5, batch[:, 1, ::2, ::2].long() % 7

    codes = tmp_path / "codes.lmdb"
    extract_codes(encode, ImageTensorDataset(images, torch.arange(40) % 3), codes, plan, batch_size=8, progress=False)
    results = run_quick("streams", tmp_path, "# Streams benchmark", "--codes", str(codes))
    assert [(r["streams"], r["seed"]) for r in results["runs"]] == [("one", 0), ("two", 0)]
    assert all(r["steps"] >= 1 and r["validation_bits"] > 0 for r in results["runs"])
    parameters = results["config"]["parameters"]
    assert parameters["two"] > parameters["one"]
    assert results["two_minus_one"] == [results["runs"][1]["validation_bits"] - results["runs"][0]["validation_bits"]]


def test_extract_quick_runs_the_script_in_both_precisions(tmp_path):
    """Four runs of extract_codes.py (a start-up of seconds each): a longer limit than run_quick's."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "extract", "--quick", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "extract.json").read_text())
    assert (tmp_path / "extract.md").read_text().startswith("# Code extraction through extract_codes.py")
    for precision in PRECISIONS:
        assert len(results["speed"][precision]["images_per_s"]) == results["config"]["rounds"]
        assert results["speed"][precision]["median_images_per_s"] > 0
    assert results["speed"]["images"] == 7  # 8 images, one held out as the folder's test split
    for level in ("top", "bottom"):
        assert 0 <= results["codes"][level]["codes_changed"] <= 1
    assert results["codes"]["reconstruction_mse"]["fp32"] > 0


@pytest.mark.parametrize("module", [train, sample, vqvae, lmdb, precision, streams, extract, ood, guidance, codecs],
                         ids=["train", "sample", "vqvae", "lmdb", "precision", "streams", "extract", "ood", "guidance", "codecs"])
def test_committed_markdown_is_made_from_committed_json(module):
    name = module.__name__.rsplit(".", 1)[1]
    results = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    assert module.REPORT.markdown(results) == (ROOT / "bench" / "results" / f"{name}.md").read_text()


def test_precision_reads_the_last_result_line_of_a_script():
    output = "new run\ntest bits/dim: 9.1000\nsamples: x.png\ntest bits/dim: 5.2675\n"
    assert precision.last_line_value(output, "test bits/dim: ") == 5.2675
    with pytest.raises(RuntimeError, match="no line starting with"):
        precision.last_line_value("error: bad data\n", "test bits/dim: ")


def test_train_profile_names_the_ops_of_a_step():
    x = torch.randn(64, 64, requires_grad=True)
    rows = train.profile_step(lambda: (x @ x).sum().backward(), top=3)
    assert len(rows) == 3 and any("mm" in row["op"] for row in rows)
    assert all(0 < row["share"] <= 1 and row["calls"] >= 1 for row in rows)


def test_precision_compares_bf16_and_the_control_with_fp32_of_the_same_seed():
    test_bits = {("fp32", 0): 5.0, ("bf16", 0): 5.1, ("control", 0): 4.9,
                 ("fp32", 1): 5.5, ("bf16", 1): 5.4, ("control", 1): 5.8}
    runs = [{"run": name, "seed": seed, "test_bits_fp32": bits} for (name, seed), bits in test_bits.items()]
    comparison = precision.compare(runs, "test_bits_fp32")
    assert comparison["bf16_minus_fp32"] == pytest.approx([0.1, -0.1])
    assert comparison["control_minus_fp32"] == pytest.approx([-0.1, 0.3])
    assert comparison["fp32_seed_range"] == pytest.approx(0.5)
    line = precision.gap_line("test bits/dim", comparison)
    assert "bf16 +0.1000, -0.1000 (mean +0.0000)" in line and line.endswith("within the largest control gap (0.3000)")


def test_codecs_are_lossless_and_scored_by_file_size():
    """Each codec decodes back to the very pixels (else its size would not be a lossless rate), and
    a flat image costs far fewer bits than noise."""
    noise = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flat = torch.full((3, 32, 32), 77, dtype=torch.uint8)
    for name, options in codecs.CODECS.items():
        buffer = io.BytesIO()
        Image.fromarray(noise.permute(1, 2, 0).numpy()).save(buffer, **options)
        decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
        assert torch.equal(decoded.permute(2, 0, 1), noise), name
        assert codecs.codec_bits_per_subpixel([noise], options) == 8 * buffer.tell() / noise.numel()
        assert codecs.codec_bits_per_subpixel([flat], options) < 1 < 7 < codecs.codec_bits_per_subpixel([noise], options)


def test_codecs_crops_of_other_photos_are_fixed_and_cut_like_the_builtin_ones(tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(photo)
    crops = codecs.photo_crops([photo], 5, 16)
    assert crops.shape == (5, 3, 16, 16) and crops.dtype == torch.uint8
    assert torch.equal(crops, codecs.photo_crops([photo], 5, 16))
    assert not torch.equal(crops, codecs.photo_crops([photo], 5, 16, seed=1))


def test_bench_refuses_a_missing_photo_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    result = run_in_process("scripts/bench.py", "codecs", "--quick", "--no-model", "--other-photos",
                            tmp_path / "missing.jpg", "--out", out)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "missing.jpg" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_codecs_table_averages_the_seeds_at_each_mark():
    run = lambda steps, held_out, other: [{"minutes": 2.0, "steps": steps, "held_out": held_out, "other": other}]
    results = {"config": {"n_images": {"held_out": 10, "other": 4}, "preset": "cpu-small (the trainer's default)",
                          "eval_data": "builtin", "other_photos": ["a.jpg"], "train_data": "builtin", "marks": [2.0]},
               "codecs": {"PNG": {"held_out": 5.0, "other": 5.5}},
               "runs": {"0": run(100, 4.0, 4.5), "1": run(110, 4.2, 4.9)},
               "cpu": "x", "threads": 2, "torch": "t", "date": "d", "load_average_before": [0], "load_average_after": [0]}
    header, rows, notes = codecs.table(results)
    assert rows[0] == ("PNG", "5.000", "5.500")
    assert rows[1] == ("PixelSNAIL cpu-small after 2 min (105 steps), mean of 2 seeds", "4.100", "4.700")
    assert any(note.startswith("seed 1: 2 min, step 110: 4.2000 / 4.9000") for note in notes)


def test_train_add_keeps_the_committed_cases_and_describes_the_added_run(tmp_path):
    committed = json.loads((ROOT / "bench" / "results" / "train.json").read_text())
    path = tmp_path / "train.json"
    path.write_text(json.dumps(committed))
    case = {**committed["cases"]["cifar10"], "description": "a new case"}
    run = {"date": "2026-11-29", "command": "python scripts/bench.py train --cases new --add", "threads": 2,
           "load_average_before": [1.0], "load_average_after": [2.0], "matmul_peak": committed["matmul_peak"]}
    added = train.added_to(path, {**run, "cases": {"new": case}})
    assert list(added["cases"]) == [*committed["cases"], "new"] and added["cases"]["new"]["run"] == run
    markdown = train.REPORT.markdown(added)
    assert "new: added by `python scripts/bench.py train --cases new --add` on 2026-11-29" in markdown


def test_eval_quick_evaluates_every_stage_of_a_run(tmp_path, tiny_pipeline):
    results = run_quick("eval", tmp_path, "# Evaluation of every stage", "--run-dir", str(tiny_pipeline),
                        "--data", str(tiny_pipeline / "images"))
    assert results["config"]["per_class"] == evaluate.QUICK_DEFAULTS["per_class"]
    assert set(results["stages"]) == set(evaluate.STAGES) == set(results["seconds"])
    assert all(seconds > 0 for seconds in results["seconds"].values())
    assert results["printed"]["samples"][-1].startswith("CAS: ")
    assert 0 <= results["stages"]["samples"]["cas"] <= 1


def test_ood_quick_measures_every_kind_for_both_models(tmp_path):
    results = run_quick("ood", tmp_path, "# Out-of-distribution detection by likelihood")
    assert set(results["models"]) == {"pixel model", "pipeline"}
    for measured in results["models"].values():
        for by_kind in measured["aurocs"].values():
            assert set(by_kind) == set(ood.KINDS) and all(0 <= value <= 1 for value in by_kind.values())
    assert set(results["models"]["pipeline"]["aurocs"]) == {
        "top + bottom bits", "top bits/code", "bottom bits/code", "VQ-VAE reconstruction MSE"}


def test_ood_auroc_is_the_rank_statistic():
    inside = {"score": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)}
    kinds = {kind: {"score": torch.tensor([2.5, 5.0], dtype=torch.float64)} for kind in ood.KINDS}
    # pairs (outside > inside): 2.5 beats 1 and 2, 5.0 beats all 4: 6 of 8
    assert ood.aurocs({ood.IN_DISTRIBUTION: inside, **kinds})["score"] == {kind: 0.75 for kind in ood.KINDS}
    # scores of thousands of bits (which a sigmoid would round to 1 alike), and a tie, which counts half
    inside = {"score": torch.tensor([1600.0, 1650.0, 1700.0], dtype=torch.float64)}
    kinds = {kind: {"score": torch.tensor([1650.0, 2200.0], dtype=torch.float64)} for kind in ood.KINDS}
    assert ood.aurocs({ood.IN_DISTRIBUTION: inside, **kinds})["score"] == {kind: 4.5 / 6 for kind in ood.KINDS}
