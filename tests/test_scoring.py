"""Per-image scores and likelihood maps (pipelines.infer.scoring, scripts/score.py) on tiny random models:
the per-image scores average to evaluate.py's and the priors' evaluation, the maps sum to the
totals, the class mixture is the mixture, and the script's refusals."""

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from launch import ok, run_in_process, run_script
from pipelines.data.codes import code_inputs
from pipelines.data.datasets import load_dataset, to_model_range
from pipelines.device import make_runtime
from pipelines.eval.stages import evaluate_bits
from pipelines.infer.extract import extract_with_vqvae
from pipelines.infer.generation import load_pipeline
from pipelines.infer.scoring import MIXTURE, Level, choose_labels, score_levels, score_pipeline
from pipelines.store.checkpoint import PIXELSNAIL_KIND, VQVAE_KIND, resolve_checkpoint, save_checkpoint
from pipelines.store.codes import CodeDataset, file_sha256
from pipelines.store.provenance import PriorProvenance, prior_fields
from pipelines.train import runtime
from prior import PixelSNAIL, get_preset
from vqvae import VQVAE2, VQVAE2Config

pytestmark = pytest.mark.usefixtures("one_thread")


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def pixel_model(n_classes=0, seed=0):
    torch.manual_seed(seed)
    return PixelSNAIL(dataclasses.replace(get_preset("tiny").model, n_classes=n_classes)).eval()


def test_mean_of_per_image_bits_is_evaluate_py_result_and_maps_are_written(image_folder, tmp_path):
    model = pixel_model()
    save_checkpoint(tmp_path / "pixels.safetensors", model.state_dict(), PIXELSNAIL_KIND, model.config, step=0)
    common = ["--ckpt", str(tmp_path / "pixels.safetensors"), "--data", str(image_folder), "--batch-size", "3"]
    out = ok("scripts/score.py", *common, "--out", str(tmp_path / "scores.csv"), "--maps", str(tmp_path / "maps"),
             in_process=True)
    evaluated = ok("scripts/evaluate.py", *common, in_process=True).strip().splitlines()[-1]
    rows = read_csv(tmp_path / "scores.csv")
    assert len(rows) == 4 and [row["image"] for row in rows] == ["0", "1", "2", "3"]  # every 10th of 40: test
    mean = sum(float(row["bits_per_dim"]) for row in rows) / len(rows)
    assert evaluated == f"test bits/dim: {mean:.4f}"
    assert f"bits_per_dim: {mean:.4f}" in out
    for row in rows:
        assert float(row["total_bits"]) == pytest.approx(float(row["bits_per_dim"]) * 3 * 8 * 8, rel=1e-5)
    maps = sorted(path.name for path in (tmp_path / "maps").iterdir())
    assert maps == [f"{k:06d}.png" for k in range(4)]
    assert Image.open(tmp_path / "maps" / maps[0]).size[0] > 100


def test_pixel_maps_sum_to_the_per_image_bits(smooth_pixels):
    model = pixel_model(n_classes=3)
    x = to_model_range(torch.from_numpy(smooth_pixels[:6]).permute(0, 3, 1, 2))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    (score,) = score_levels([Level("pixels", model, x, None)], labels)
    assert torch.equal(score.bits, model.nll(x, labels))  # the very per-image figure evaluate.py averages
    assert score.bits_map.shape == (6, 8, 8)
    torch.testing.assert_close(score.bits_map.sum(dim=(1, 2)), score.bits * 3 * 64, rtol=1e-5, atol=0)


def test_mixture_is_the_mean_likelihood_over_classes_and_its_maps_sum_to_it(smooth_pixels):
    model = pixel_model(n_classes=3, seed=1)
    x = to_model_range(torch.from_numpy(smooth_pixels[:5]).permute(0, 3, 1, 2))
    (mixed,) = score_levels([Level("pixels", model, x, None)], MIXTURE)
    # independently: -log2 of the mean over classes of 2^-(total bits given the class)
    totals = torch.stack([model.nll(x, torch.full((5,), c)).double() * 3 * 64 for c in range(3)])  # (C, B)
    expected = -(torch.logsumexp(-totals * math.log(2), dim=0) - math.log(3)) / math.log(2)
    torch.testing.assert_close(mixed.total_bits.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(mixed.bits.double(), expected / (3 * 64), rtol=1e-5, atol=0)
    # the mixture costs at most log2(C) bits more than the best class, never less than it
    assert (mixed.total_bits.double() >= totals.min(0).values - 1e-3).all()
    assert (mixed.total_bits.double() <= totals.min(0).values + math.log2(3) + 1e-3).all()


def test_a_mixture_over_classes_that_make_no_difference_is_each_class(smooth_pixels):
    model = pixel_model(n_classes=2, seed=2)
    with torch.no_grad():
        model.class_embed.weight.zero_()  # every class conditions alike
    x = to_model_range(torch.from_numpy(smooth_pixels[:4]).permute(0, 3, 1, 2))
    (mixed,) = score_levels([Level("pixels", model, x, None)], MIXTURE)
    (given,) = score_levels([Level("pixels", model, x, None)], torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mixed.bits_map, given.bits_map, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Two class folders of 16x16 images, a random VQ-VAE, its codes (the test split) and random
    class-conditional priors recorded as trained on them."""
    root = tmp_path_factory.mktemp("scoring")
    rng = np.random.default_rng(0)
    for label, colour in enumerate(([200, 40, 40], [40, 40, 200])):
        (root / "images" / f"class{label}").mkdir(parents=True)
        for k in range(10):
            image = np.array(colour) * rng.uniform(0.5, 1, (16, 16, 1)) + rng.normal(0, 10, (16, 16, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / f"class{label}" / f"{k}.png")
    torch.manual_seed(0)
    config = VQVAE2Config(channels=8, res_channels=4, n_res_blocks=1, top_codes=16, bottom_codes=16, code_dim=4)
    save_checkpoint(root / "vqvae.safetensors", VQVAE2(config).state_dict(), VQVAE_KIND, config, image_size=16)
    extract_with_vqvae(root / "vqvae.safetensors", str(root / "images"), root / "codes.lmdb", "test", None, 2, 4, 0,
                       "cpu", "fp32")
    vqvae_hash = file_sha256(resolve_checkpoint(root / "vqvae.safetensors"))
    for level in ("top", "bottom"):
        record = PriorProvenance(level, vqvae_hash, 16, (2, 2), (4, 4), 16, 16, 2)
        prior_config = dataclasses.replace(get_preset(f"cpu-{level}").model, channels=8, **prior_fields(record))
        save_checkpoint(root / f"{level}.safetensors", PixelSNAIL(prior_config).state_dict(), PIXELSNAIL_KIND,
                        prior_config, step=0, **record.to_extra())
    return root


def pipeline_args(root):
    return ["--vqvae", str(root / "vqvae.safetensors"), "--top", str(root / "top.safetensors"),
            "--bottom", str(root / "bottom.safetensors")]


def test_pipeline_bits_per_code_average_to_the_priors_evaluation_on_the_same_codes(pipeline, tmp_path):
    out = tmp_path / "scores.csv"
    ok("scripts/score.py", *pipeline_args(pipeline), "--data", str(pipeline / "images"), "--out", str(out),
       "--batch-size", "3", "--maps", str(tmp_path / "maps"), in_process=True)
    rows = read_csv(out)
    assert len(rows) == 2 and [row["label"] for row in rows] == ["0", "1"]  # the folders' classes
    loaded = load_pipeline(pipeline / "vqvae.safetensors", pipeline / "top.safetensors", pipeline / "bottom.safetensors")
    accelerator = runtime.make_accelerator("fp32", device="cpu")
    codes = DataLoader(CodeDataset(pipeline / "codes.lmdb"), batch_size=1)
    for level in ("top", "bottom"):
        evaluated = evaluate_bits(getattr(loaded, level), codes, accelerator, code_inputs(level, True), autocast=False)
        scored = sum(float(row[f"{level}_bits_per_code"]) for row in rows) / len(rows)
        assert scored == pytest.approx(evaluated, rel=1e-6)
    for row in rows:
        total = float(row["top_bits_per_code"]) * 4 + float(row["bottom_bits_per_code"]) * 16
        assert float(row["total_bits"]) == pytest.approx(total, rel=1e-6)
        assert float(row["reconstruction_mse"]) > 0
    assert len(list((tmp_path / "maps").iterdir())) == 2


def test_pipeline_maps_sum_to_each_level_and_the_mixture_to_the_joint(pipeline):
    loaded = load_pipeline(pipeline / "vqvae.safetensors", pipeline / "top.safetensors", pipeline / "bottom.safetensors")
    images, _ = next(iter(DataLoader(load_dataset(str(pipeline / "images"), "train", 16), batch_size=5)))
    runtime = make_runtime("cpu", "fp32")
    given = score_pipeline(loaded, images, torch.ones(5, dtype=torch.long), runtime)
    for level, positions in zip(given.levels, (4, 16)):
        assert level.bits_map.shape == (5, *((2, 2) if level.name == "top" else (4, 4)))
        torch.testing.assert_close(level.total_bits, level.bits * positions, rtol=1e-5, atol=0)
    mixed = score_pipeline(loaded, images, MIXTURE, runtime)
    per_class = [score_pipeline(loaded, images, torch.full((5,), c), runtime) for c in (0, 1)]
    joint = torch.stack([sum(level.total_bits.double() for level in s.levels) for s in per_class])  # (C, B)
    expected = -(torch.logsumexp(-joint * math.log(2), dim=0) - math.log(2)) / math.log(2)
    torch.testing.assert_close(sum(level.total_bits.double() for level in mixed.levels), expected, rtol=1e-5, atol=0)
    top_alone = torch.stack([s.levels[0].total_bits.double() for s in per_class])
    top_expected = -(torch.logsumexp(-top_alone * math.log(2), dim=0) - math.log(2)) / math.log(2)
    torch.testing.assert_close(mixed.levels[0].total_bits.double(), top_expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(mixed.reconstruction_mse, given.reconstruction_mse)


def test_loose_files_of_a_class_conditional_model_need_a_label(pipeline, tmp_path):
    files = [str(pipeline / "images" / "class0" / "0.png"), str(pipeline / "images" / "class1")]
    result = run_script("scripts/score.py", *pipeline_args(pipeline), *files, "--out", str(tmp_path / "a.csv"))
    assert result.returncode == 2 and not (tmp_path / "a.csv").exists()
    assert result.stderr.strip().splitlines() == [
        "error: the model is class-conditional (2 classes) and image files has no classes: give --label N "
        "(a class in [0, 2)) or --label mixture (the class unknown)"]
    ok("scripts/score.py", *pipeline_args(pipeline), *files, "--label", "mixture", "--out", str(tmp_path / "b.csv"),
       in_process=True)
    rows = read_csv(tmp_path / "b.csv")
    assert [Path(row["image"]).name for row in rows] == ["0.png", *(f"{k}.png" for k in range(10))]
    assert {row["label"] for row in rows} == {"mixture"}


@pytest.mark.parametrize("option, n_classes, dataset_classes, expected", [
    (None, 0, 8, None), (None, 3, 3, "data"), ("data", 3, 2, "data"), ("2", 3, 0, 2), (MIXTURE, 3, 0, MIXTURE),
    ("1", 0, 3, "not class-conditional"), (None, 3, 0, "has no classes"), (None, 3, 1, "has no classes"),
    (None, 6, 8, "labels up to 7 but the model knows 6"), ("3", 3, 0, "must lie in [0, 3)"),
    ("cat", 3, 0, "must be a class in [0, 3), data or mixture"),
])
def test_choose_labels(option, n_classes, dataset_classes, expected):
    if expected is None or expected in ("data", MIXTURE) or isinstance(expected, int):
        assert choose_labels(option, n_classes, dataset_classes, "builtin") == expected
    else:
        with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            choose_labels(option, n_classes, dataset_classes, "builtin")


def test_score_py_refuses_bad_combinations_in_one_line(tmp_path):
    """In this process (test_loose_files_of_a_class_conditional_model_need_a_label refuses on the real
    command line)."""
    for args, message in (
        (["--ckpt", "x", "--vqvae", "y", "--data", "builtin"], "give a pixel model (--ckpt) or the pipeline"),
        (["--vqvae", "y", "--data", "builtin"], "needs all three"),
        (["--ckpt", str(tmp_path / "missing"), "--data", "builtin"], "checkpoint not found"),
    ):
        result = run_in_process("scripts/score.py", *args, "--out", str(tmp_path / "s.csv"))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
        assert not (tmp_path / "s.csv").exists()
