"""`python -m bench` still runs end to end and writes what the README quotes; the benchmarks'
harness cannot mislead (no benchmark imports another, no worker blocks on a pipe, no results file
records a machine's directories)."""

import ast
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import (codec, codecs, common, denormals, evaluate, extract, gpu, guidance, lmdb, ood, precision, recipe,
                   revisions, sample, sample_pipeline, streams, train, vqvae)
from launch import run_in_process
from pipelines.data.datasets import ImageTensorDataset, load_dataset
from pipelines.infer.extract import extract_codes

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")


def run_quick(benchmark, out_dir, heading, *options, name=None):
    """Runs `python -m bench <benchmark> --quick [options]`, checks the markdown's heading and the
    machine's description in the JSON (`name`.json, by default the benchmark's name), and returns
    the JSON. The timeout leaves room for a machine shared with other jobs."""
    subprocess.run(
        [sys.executable, "-m", "bench", benchmark, "--quick", "--out", str(out_dir), *options],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=300,
    )
    name = name or benchmark
    results = json.loads((out_dir / f"{name}.json").read_text())
    assert (out_dir / f"{name}.md").read_text().startswith(heading)
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
    subprocess.run([sys.executable, "-m", "bench", "sample", "--pipeline", "--quick", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
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
    rows = {(row["preset"], row["batch"], row["variant"]): row for row in results["batches"]}
    for preset in ("cpu-top", "cpu-bottom"):
        before, after = rows[preset, 4, "before"], rows[preset, 4, "after"]
        assert before["samples_per_s"] > 0 and after["samples_per_s"] > 0
        # the per-sample loop adds ops with the batch; the keyed draw does not
        assert after["ops_per_position"] == rows[preset, 1, "after"]["ops_per_position"]
        assert before["ops_per_position"] > rows[preset, 1, "before"]["ops_per_position"]


def test_sample_pipeline_of_the_ffhq_hierarchy_times_three_levels_and_decodes_them(tmp_path):
    subprocess.run([sys.executable, "-m", "bench", "sample", "--pipeline", "--hierarchy", "ffhq1024", "--quick",
                    "--precisions", "bf16", "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True,
                   text=True, timeout=300)
    results = json.loads((tmp_path / "sample-pipeline-ffhq1024.json").read_text())
    assert (tmp_path / "sample-pipeline-ffhq1024.md").read_text() == sample_pipeline.report_of(results).markdown(results)
    assert list(results["levels"]) == ["top", "middle", "bottom"] and results["n"] == 4 and "batches" not in results
    assert results["decode"]["image_shape"] == [4, 3, 32, 32] and results["decode"]["bf16"] > 0
    assert "s/position (batch 4)" in (tmp_path / "sample-pipeline-ffhq1024.md").read_text()


def test_committed_pipeline_markdown_is_made_from_committed_json():
    for name in ("sample-pipeline", "sample-pipeline-before", "sample-pipeline-cast-once", "sample-pipeline-after",
                 "sample-pipeline-ffhq1024"):
        results = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
        assert sample_pipeline.report_of(results).markdown(results) == (
            ROOT / "bench" / "results" / f"{name}.md").read_text()


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


def tiny_code_database(path):
    """A code database of 40 records: 2x2 top and 4x4 bottom codes."""
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plan = dict(top_shape=(2, 2), bottom_shape=(4, 4), top_codes=5, bottom_codes=7, n_classes=3,
                vqvae_sha256="ab" * 32, image_size=8, source={"data": "random", "split": "train"})

    def encode(batch):
        return batch[:, 0, ::4, ::4].long() % 5, batch[:, 1, ::2, ::2].long() % 7

    extract_codes(encode, ImageTensorDataset(images, torch.arange(40) % 3), path, plan, batch_size=8, progress=False)
    return path


def test_streams_quick_trains_one_and_two_streams_on_a_code_database(tmp_path):
    codes = tiny_code_database(tmp_path / "codes.lmdb")
    results = run_quick("streams", tmp_path, "# Streams benchmark", "--codes", str(codes))
    assert [(r["streams"], r["seed"]) for r in results["runs"]] == [("one", 0), ("two", 0)]
    assert all(r["steps"] >= 1 and r["validation_bits"] > 0 for r in results["runs"])
    parameters = results["config"]["parameters"]
    assert parameters["two"] > parameters["one"]
    assert results["two_minus_one"] == [results["runs"][1]["validation_bits"] - results["runs"][0]["validation_bits"]]
    assert results["config"]["budget"] == "equal wall time" and results["config"]["steps"] is None
    assert all(r["seconds_per_step"] > 0 and r["train_seconds"] <= r["seconds"] for r in results["runs"])
    assert len(results["step_time_ratio"]) == 1


def test_streams_at_equal_steps_trains_every_run_that_many_steps(tmp_path):
    codes = tiny_code_database(tmp_path / "codes.lmdb")
    results = run_quick("streams", tmp_path, f"# {streams.STEPS_REPORT.title}", "--codes", str(codes), "--steps", "3",
                        name="streams-steps")
    assert not (tmp_path / "streams.json").exists()
    assert results["config"]["budget"] == "equal steps" and results["config"]["steps"] == 3
    assert [(r["streams"], r["steps"]) for r in results["runs"]] == [("one", 3), ("two", 3)]
    assert all(r["seconds_per_step"] > 0 for r in results["runs"])
    assert "3 steps per run, no time budget" in (tmp_path / "streams-steps.md").read_text()


def test_streams_step_time_ratio_counts_the_steps_both_runs_made_side_by_side():
    """The one-stream run (a step a second) ends at second 10; the two-stream run (a step every 1.8
    s, from second 0.5) goes on alone to second 30: the ratio is of the steps made before second 10."""
    one = {"steps": 10, "train_seconds": 10.0, "step_times": [0.0, *(1.0 * k for k in range(1, 11))]}
    two = {"steps": 16, "train_seconds": 28.8, "step_times": [0.5, *(0.5 + 1.8 * k for k in range(1, 17))]}
    assert streams.step_time_ratio([one, two]) == pytest.approx(1.8)
    assert one["seconds_per_step"] == 1.0 and two["seconds_per_step"] == pytest.approx(1.8)
    assert "step_times" not in one and two["side_by_side_seconds_per_step"] == pytest.approx(1.8)
    late = {"steps": 1, "train_seconds": 5.0, "step_times": [9.5, 14.5]}  # no step ended while both trained
    assert streams.step_time_ratio([{**one, "step_times": [0.0, 1.0, 2.0]}, late]) is None


def test_extract_quick_runs_the_script_in_both_precisions(tmp_path):
    """Four runs of extract_codes.py (a start-up of seconds each): a longer limit than run_quick's."""
    subprocess.run([sys.executable, "-m", "bench", "extract", "--quick", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "extract.json").read_text())
    assert (tmp_path / "extract.md").read_text().startswith("# Code extraction through extract_codes.py")
    for precision in PRECISIONS:
        assert len(results["speed"][precision]["images_per_s"]) == results["config"]["rounds"]
        assert results["speed"][precision]["median_images_per_s"] > 0
    assert results["speed"]["images"] == 7  # 8 images, one held out as the folder's test split
    for level in ("top", "bottom"):
        assert 0 <= results["codes"][level]["codes_changed"] <= 1
    assert results["codes"]["reconstruction_mse"]["fp32"] > 0


@pytest.mark.parametrize("module", [train, sample, vqvae, lmdb, precision, streams, extract, ood, guidance, codecs, codec,
                                    revisions, denormals],
                         ids=["train", "sample", "vqvae", "lmdb", "precision", "streams", "extract", "ood", "guidance", "codecs",
                              "codec", "revisions", "denormals"])
def test_committed_markdown_is_made_from_committed_json(module):
    name = module.__name__.rsplit(".", 1)[1]
    results = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    assert module.REPORT.markdown(results) == (ROOT / "bench" / "results" / f"{name}.md").read_text()


def test_denormals_quick_times_both_arms_alternating_and_flushing_changes_no_result(tmp_path):
    results = run_quick("denormals", tmp_path, f"# {denormals.REPORT.title}")
    cases = results["cases"]
    assert [(c["arm"], c["model"], c["flush"]) for c in cases] == [
        ("train", "confident", False), ("codec", "young", False), ("codec", "confident", False),
        ("train", "confident", True), ("codec", "young", True), ("codec", "confident", True)]
    assert all(c["seconds"] > 0 for c in cases)
    kept, flushed = (c for c in cases if c["arm"] == "train")
    assert (kept["train_bits"], kept["test_bits"]) == (flushed["train_bits"], flushed["test_bits"])
    assert cases[1]["sha256"] != cases[2]["sha256"]  # two models, two codes
    changed = [model for model, kept, flushed in (("young", cases[1], cases[4]), ("confident", cases[2], cases[5]))
               if kept["sha256"] != flushed["sha256"]]
    markdown = (tmp_path / "denormals.md").read_text()
    assert "the losses agree to every digit" in markdown
    assert ("flushing changes the files of the " + " and the ".join(changed) if changed else
            "flushing changes no file") in markdown


def test_denormals_refuses_a_young_model_as_old_as_the_confident_one_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "denormals", "--quick", "--young", "20", "--steps", "20",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "need 1 <= young < steps" in result.stderr and "young 20, steps 20" in result.stderr
    assert not list(tmp_path.iterdir())


def test_recipe_grey_photos_are_an_image_folder_of_greyscale_crops_as_rgb_in_both_splits(tmp_path):
    folder = common.write_grey_folder(tmp_path / "grey", 8, 40)
    for split in ("train", "test"):
        dataset = load_dataset(str(folder), split, 8)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        assert images.shape == (40, 3, 8, 8)
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # grey as RGB
    assert len(list((folder / "train").iterdir())) == len(list((folder / "test").iterdir())) == 40


def test_committed_recipe_markdown_is_made_from_committed_json():
    for report in (recipe.REPORT, recipe.GREY_REPORT):
        results = json.loads((ROOT / "bench" / "results" / f"{report.name}.json").read_text())
        assert report.markdown(results) == (ROOT / "bench" / "results" / f"{report.name}.md").read_text()


def test_precision_reads_the_last_result_line_of_a_script():
    output = "new run\ntest bits/dim: 9.1000\nsamples: x.png\ntest bits/dim: 5.2675\n"
    assert common.last_line_value(output, "test bits/dim: ") == 5.2675
    with pytest.raises(RuntimeError, match="no line starting with"):
        common.last_line_value("error: bad data\n", "test bits/dim: ")


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
    crops = common.photo_crops([photo], 5, 16)
    assert crops.shape == (5, 3, 16, 16) and crops.dtype == torch.uint8
    assert torch.equal(crops, common.photo_crops([photo], 5, 16))
    assert not torch.equal(crops, common.photo_crops([photo], 5, 16, seed=1))


def test_bench_refuses_a_missing_photo_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    result = run_in_process("bench/__main__.py", "codecs", "--quick", "--no-model", "--other-photos",
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


def recipe_results(*runs):
    curve = lambda held_out, other: [{"steps": 100, "session_seconds": 5.0, "held_out": held_out, "other": other}]
    return {"config": {"preset": "cpu-small", "preset_default": [0.98, 4e-3], "marks": [100], "train_data": "builtin",
                       "eval_data": "builtin", "other_photos": ["a.jpg"], "n_other": 4},
            "runs": [{"polyak": p, "lr": lr, "seed": seed, "curve": curve(h, o)} for p, lr, seed, h, o in runs],
            "cpu": "x", "threads": 2, "torch": "t", "date": "d", "load_average_before": [0], "load_average_after": [0]}


def test_recipe_ranks_the_variants_by_their_mean_over_seeds_and_says_whether_the_other_photos_agree():
    results = recipe_results((0.98, 4e-3, 0, 4.0, 5.0), (0.98, 4e-3, 1, 4.4, 5.2), (0.995, 2e-3, 0, 4.1, 4.9))
    header, rows, notes = recipe.table(results)
    assert [row[:3] for row in rows] == [("0.98 (preset)", "0.004", "0"), ("0.98 (preset)", "0.004", "1"),
                                        ("0.995", "0.002", "0")]
    assert ("step 100, by mean held-out bits/dim: 0.995 / 0.002: 4.1000 (other 4.9000), 0.98 / 0.004: 4.2000 "
            "(other 5.1000); best on held-out 0.995 / 0.002, also best on the other photos") in notes
    disagreeing = recipe_results((0.98, 4e-3, 0, 4.0, 4.8), (0.995, 2e-3, 0, 4.1, 4.7))
    assert recipe.table(disagreeing)[2][1].endswith(
        "best on held-out 0.98 / 0.004, but 0.995 / 0.002 is best on the other photos")


def test_recipe_add_refuses_results_of_other_settings_and_variants_are_read_strictly(tmp_path):
    path = tmp_path / "recipe.json"
    results = recipe_results((0.98, 4e-3, 0, 4.0, 5.0))
    path.write_text(json.dumps(results))
    assert recipe.earlier_runs(path, results["config"]) == results["runs"]
    with pytest.raises(ValueError, match="other settings"):
        recipe.earlier_runs(path, {**results["config"], "marks": [200]})
    with pytest.raises(ValueError, match="no .* to add to"):
        recipe.earlier_runs(tmp_path / "none.json", results["config"])
    assert recipe.variant("0.995:2e-3") == (0.995, 0.002)
    for text in ("0.995", "0.995:", "a:1e-3"):
        with pytest.raises(ValueError, match="POLYAK:LR"):
            recipe.variant(text)


def test_train_add_keeps_the_committed_cases_and_describes_the_added_run(tmp_path):
    committed = json.loads((ROOT / "bench" / "results" / "train.json").read_text())
    path = tmp_path / "train.json"
    path.write_text(json.dumps(committed))
    case = {**committed["cases"]["cifar10"], "description": "a new case"}
    run = {"date": "2026-11-29", "command": "python -m bench train --cases new --add", "threads": 2,
           "load_average_before": [1.0], "load_average_after": [2.0], "matmul_peak": committed["matmul_peak"]}
    added = train.added_to(path, {**run, "cases": {"new": case}})
    assert list(added["cases"]) == [*committed["cases"], "new"] and added["cases"]["new"]["run"] == run
    markdown = train.REPORT.markdown(added)
    assert "new: added by `python -m bench train --cases new --add` on 2026-11-29" in markdown


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


# -- a harness that cannot mislead ---------------------------------------------------------------


BENCHMARKS = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def bench_imports(path):
    """The bench modules a module imports, at any depth (a lazy import inside a function counts)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(filter(None, ["bench", node.module])) if node.level else node.module  # relative
            names |= {f"bench.{alias.name}" for alias in node.names} if module == "bench" else {module}
    return {name for name in names if name == "bench" or name.startswith("bench.")}


def test_no_benchmark_imports_another():
    """A benchmark imports bench.common only: what several share lives there, and no import cycle
    hides behind a lazy import."""
    assert len(BENCHMARKS) >= 12
    for path in BENCHMARKS:
        others = {name for name in bench_imports(path) if name.split(".")[:2] != ["bench", "common"]}
        assert not others, f"{path.name} imports {sorted(others)}"


# a worker that writes over 1 MiB to stdout and to stderr; the slow one starts writing only once the
# fast one has written everything: a harness that leaves the fast one's output in a pipe it does not
# read (the old streams benchmark read its workers one after the other) stalls it, and the slow one fails
WRITER = """
import os, sys, time
role, marker, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "slow":
    deadline = time.monotonic() + 60
    while not os.path.exists(marker):
        if time.monotonic() > deadline:
            sys.exit("the fast worker never finished writing: it is blocked on its output")
        time.sleep(0.01)
line = role + " " + "x" * 1000 + "\\n"
for _ in range(size // len(line) + 1):
    sys.stdout.write(line)
    sys.stderr.write(line)
sys.stdout.flush()
sys.stderr.flush()
if role == "fast":
    open(marker, "w").close()
"""


def test_workers_writing_megabytes_run_side_by_side_and_return_everything(tmp_path):
    size = 3 * 2**20 // 2  # 1.5 MiB to each stream
    commands = [[sys.executable, "-c", WRITER, role, tmp_path / "fast-done", size] for role in ("slow", "fast")]
    start = time.monotonic()
    slow, fast = common.run_together(commands, timeout=120)
    assert time.monotonic() - start < 120
    for result, role in ((slow, "slow"), (fast, "fast")):
        assert result.returncode == 0, result.stderr[-500:]
        for output in (result.stdout, result.stderr):
            assert len(output) > 2**20 and output.count("\n") == size // 1006 + 1 and set(output.split()) == {
                role, "x" * 1000}, role


def test_a_failed_or_late_worker_raises_and_no_worker_outlives_the_runner(tmp_path):
    with pytest.raises(RuntimeError, match="exit status 3"):
        common.run_command([sys.executable, "-c", "import sys; sys.stderr.write('bad'); sys.exit(3)"])
    with pytest.raises(subprocess.TimeoutExpired):
        common.run_together([[sys.executable, "-c", "import time; time.sleep(60)"]] * 2, timeout=1)
    assert common.run_command([sys.executable, "-c", "import sys; sys.exit(3)"], check=False).returncode == 3


def test_results_record_paths_inside_the_repository_relative_to_it_and_others_as_placeholders(tmp_path):
    inside_tmp = tmp_path.relative_to(tempfile.gettempdir()).as_posix()
    assert common.recorded_path(ROOT / "runs" / "demo" / "codes.lmdb") == "runs/demo/codes.lmdb"
    assert common.recorded_path(tmp_path / "out") == f"<tmp>/{inside_tmp}/out"
    assert common.recorded_path("/mnt/disk/runs/demo") == "<dir>/demo"
    assert common.recorded_path("builtin") == "builtin" and common.recorded_path(None) is None
    command = common.recorded_command(["streams", "--codes", str(ROOT / "runs" / "c.lmdb"), f"--out={tmp_path}"])
    assert command == f"python -m bench streams --codes runs/c.lmdb --out=<tmp>/{inside_tmp}"


def test_no_committed_results_file_records_a_machine_directory():
    files = [p for p in (ROOT / "bench" / "results").iterdir() if p.suffix in (".json", ".md")]
    assert files
    for path in files:
        found = re.findall(r"(?:/work/|/root/|/home/|/tmp/)\S*", path.read_text())
        assert not found, f"{path.name}: {found[:3]}"


def test_the_gpu_benchmarks_cached_step_runs_on_a_two_stream_model():
    """The path the GPU benchmark times (and captures as a CUDA graph): a cached sampler fed the
    positions before (i, j), then its step at (i, j), on the CPU; the bottom prior's rows of
    bench/results/gpu.md failed there. Its output is the full forward's at (i, j)."""
    from prior import PixelSNAIL, PixelSNAILConfig

    config = PixelSNAILConfig(shape=(4, 6), n_codes=7, n_classes=3, cond_codes=5, cond_shape=(2, 3), channels=8,
                              n_blocks=2, n_res_blocks=1, kernel_size=3, attention=False, streams="two",
                              embed_channels=4, cond_channels=4, cond_res_blocks=1, dropout=0.0)
    torch.manual_seed(0)
    model = PixelSNAIL(config)
    assert model.vertical_input is not None
    x, label, cond = common.random_inputs(config, 2, torch.Generator().manual_seed(0))
    model.init_from_data(x, label, cond)
    model.eval()
    with torch.no_grad():
        network, (i, j) = gpu.prepared_step(model, 2, label, cond)
        step = network.output_at(i, j)
        assert torch.equal(network.output_at(i, j), step)  # timed and replayed many times: the same each time
        full = model(torch.zeros_like(x), label, cond)[:, :, i : i + 1, j : j + 1]
    assert (i, j) == (2, 3)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_the_gpu_benchmark_runs_whole_with_the_cpu_standing_in(monkeypatch, tmp_path):
    """`python -m bench gpu --quick` end to end with the CPU in the GPU's place (torch.cuda's
    timing and memory calls stubbed; CUDA graphs fail without CUDA, which the benchmark reports as
    such): every piece runs against today's code and the report is written, so that the first
    `make gpu-check` on a GPU does not stop on an interface that changed since the last one."""
    import argparse

    monkeypatch.setattr(gpu, "CUDA", torch.device("cpu"))
    peaks = iter(range(1, 10**6))  # each read of the peak memory 1 MiB more: some memory per example
    stubs = {"synchronize": lambda *args: None, "empty_cache": lambda: None,
             "reset_peak_memory_stats": lambda *args: None, "max_memory_allocated": lambda *args: next(peaks) * 2**20,
             "get_device_name": lambda *args: "the CPU standing in"}
    for name, stub in stubs.items():
        monkeypatch.setattr(torch.cuda, name, stub)
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    gpu.run(parser.parse_args(["--quick", "--steps", "2", "--n-samples", "2", "--out", str(tmp_path)]))

    results = json.loads((tmp_path / "gpu.json").read_text())
    assert (tmp_path / "gpu.md").read_text() == gpu.REPORT.markdown(results)
    assert [case["preset"] for case in results["training"]] == ["tiny", f"tiny ({gpu.FILL})", "tiny (fused Adam)"]
    assert all("error" not in case for case in results["training"])
    assert results["training"][1]["batch_size"] == gpu.QUICK_FILL_LIMIT  # gigabytes free, a MiB per example
    assert results["vqvae"]["train_images_per_s"] > 0 and results["sampling"]["precisions"]["bf16"]["total_seconds"] > 0
    throughput = results["throughput"]
    assert 1 <= throughput["auto"] <= gpu.QUICK_PROJECTED_SAMPLES
    eager = [case for case in throughput["cases"] if case["mode"] == "eager"]
    assert [case["batch"] for case in eager] == list(gpu.QUICK_SAMPLING_BATCHES)
    assert all(case["samples_per_s"] > 0 and set(case["levels"]) == {"top", "bottom"} for case in eager)


def test_the_batch_that_fills_the_device_leaves_the_share_of_free_memory_for_its_fixed_part():
    case = {"preset": "p", "batch_size": 8, "peak_bytes": {8: 10 * 2**30}, "bytes_per_example": 2**30}  # 2 GiB fixed
    assert gpu.filling_batch(case, 100 * 2**30, 4096) == 72  # (80 - 2) GiB / 1 GiB = 78, down to a multiple of 8
    assert gpu.filling_batch(case, 100 * 2**30, 64) == 64
    assert gpu.filling_batch(case, 2**30, 4096) == 8  # never below 8: the case that does not fit says so itself
    with pytest.raises(ValueError, match="no memory per example"):
        gpu.filling_batch({**case, "bytes_per_example": 0.0}, 100 * 2**30, 4096)


def test_the_main_job_passes_every_stage_end_to_end_on_the_cpu(tmp_path):
    """`make gpu-check`'s first part (bench/e2e.py) on the CPU: every stage through the scripts passes
    and records its result line, not a launcher's warning."""
    subprocess.run([sys.executable, "-m", "bench.e2e", "--device", "cpu", "--out", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=600)
    stages = json.loads((tmp_path / "gpu-e2e.json").read_text())["stages"]
    assert len(stages) == 8 and all(stage["passed"] for stage in stages), stages
    notes = {stage["stage"]: stage["note"] for stage in stages}
    assert notes["top prior (accelerate launch)"].startswith("test bits/code: ")
    assert notes["evaluation: samples"].startswith("CAS: ")


def run_gpu_check(python, out_dir):
    return subprocess.run(["bash", "scripts/gpu_check.sh", str(out_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": str(python)})


def test_gpu_check_names_every_missing_dependency_in_one_line_before_it_runs_anything(tmp_path):
    """An interpreter without the project's packages (here one that skips its site-packages) is refused in
    one line that names them and the wheels to fetch; nothing runs and nothing is written."""
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    checked = run_gpu_check(bare, tmp_path / "out")
    assert checked.returncode != 0 and checked.stdout == ""
    assert len(checked.stderr.splitlines()) == 1, checked.stderr
    assert checked.stderr.startswith("error: this interpreter lacks torch>=2.6, ")
    assert "lmdb>=1.4" in checked.stderr and "constriction>=0.4" in checked.stderr
    assert "make gpu-wheels GPU_WHEELS='torch " in checked.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check would run whole")
def test_gpu_check_with_every_dependency_stops_at_the_missing_gpu_in_one_line(tmp_path):
    checked = run_gpu_check(sys.executable, tmp_path / "out")
    assert checked.returncode != 0
    assert checked.stderr == "error: make gpu-check needs CUDA, and torch sees no GPU here\n"
    assert not (tmp_path / "out").exists()
