"""A tiny three-level pipeline end to end through the scripts: the VQ-VAE trained with --levels 3,
its codes extracted, a prior trained at every level, then sampling, completion, scoring,
evaluation and the report with --priors, the shapes checked at every level; and a prior list that
does not fit refused by every script that takes one, in one line, before anything is written."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from launch import ok, run_in_process

SIZE = 32  # three levels of stride 16, 8 and 4: grids 2x2, 4x4 and 8x8
SHAPES = {"top": (2, 2), "middle": (4, 4), "bottom": (8, 8)}
FP32 = ["--precision", "fp32"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A pipeline directory as scripts/demo.py lays it out, made by the scripts: images/ (two classes
    of 32x32 images), vqvae/ (3 levels), codes.lmdb, and top/, middle/, bottom/ priors."""
    root = tmp_path_factory.mktemp("three_level_pipeline")
    rng = np.random.default_rng(0)
    for label, colour in enumerate(([200, 40, 40], [40, 40, 200])):
        folder = root / "images" / str(label)
        folder.mkdir(parents=True)
        for k in range(20):
            image = np.array(colour) * rng.uniform(0.5, 1.0) + rng.normal(0, 10, (SIZE, SIZE, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{k}.png")
    short = ["--batch-size", "4", "--steps", "2", "--eval-every", "2", *FP32]
    ok("scripts/train_vqvae.py", "--data", root / "images", "--preset", "cpu-small", "--levels", "3", "--size", SIZE,
       "--out", root / "vqvae", *short, in_process=True)
    ok("scripts/extract_codes.py", "--vqvae", root / "vqvae", "--data", root / "images", "--out", root / "codes.lmdb",
       in_process=True)
    for level in SHAPES:
        ok("scripts/train_prior.py", "--codes", root / "codes.lmdb", "--level", level, "--out", root / level, *short,
           in_process=True)
    return root


def model_options(root, *levels):
    return ["--vqvae", root / "vqvae", "--priors", *(root / level for level in levels or SHAPES)]


def test_every_level_is_sampled_and_completed_from_the_image_codes_it_keeps(pipeline_dir, tmp_path):
    from pipelines.data.datasets import read_image, to_model_range
    from pipelines.infer.completion import complete_codes, covering_rows
    from pipelines.infer.generation import load_pipeline

    root = pipeline_dir
    ok("scripts/sample.py", *model_options(root), "--label", "all", "--n", "2", "--out-dir", tmp_path / "samples",
       *FP32, in_process=True)
    with np.load(tmp_path / "samples" / "samples.npz") as samples:
        assert samples["images"].shape == (4, SIZE, SIZE, 3) and samples["labels"].tolist() == [0, 0, 1, 1]
        for level, shape in SHAPES.items():
            assert samples[f"{level}_codes"].shape == (4, *shape)

    image_file = root / "images" / "1" / "3.png"
    ok("scripts/complete.py", image_file, *model_options(root), "--keep", "12", "--n", "3", "--label", "1",
       "--out-dir", tmp_path / "completions", *FP32, in_process=True)
    # one row: the image, its kept part and 3 completions, 2 pixels of padding around each
    assert Image.open(tmp_path / "completions" / "0000_3.png").size == (5 * SIZE + 6 * 2, SIZE + 2 * 2)

    pipeline = load_pipeline(root / "vqvae", *(root / level for level in SHAPES))
    image = to_model_range(read_image(image_file, SIZE))
    with torch.no_grad():
        grids = pipeline.vqvae.encode(image[None])
        _, *completed = complete_codes(pipeline, image, 12, 3, label=1, generator=torch.Generator().manual_seed(0))
    for level, grid, codes in zip(SHAPES, grids, completed):
        rows = covering_rows(12, SIZE, grid.shape[1])  # top 1 of 2, middle 2 of 4, bottom 3 of 8
        assert codes.shape == (3, *SHAPES[level])
        assert torch.equal(codes[:, :rows], grid[:, :rows].expand(3, -1, -1)), level
    assert not torch.equal(completed[-1][:, 3:], grids[-1][:, 3:].expand(3, -1, -1))  # the rest is drawn


def test_every_level_is_scored_and_evaluated(pipeline_dir, tmp_path):
    from pipelines.eval.report import code_counts
    from pipelines.store.checkpoint import checkpoint_stage
    from pipelines.store.codes import CodeDataset
    from pipelines.store.results import read_evaluation

    root = pipeline_dir
    ok("scripts/score.py", *model_options(root), "--data", root / "images", "--out", tmp_path / "scores.csv", *FP32,
       in_process=True)
    with open(tmp_path / "scores.csv") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["image", "label", "top_bits_per_code", "middle_bits_per_code", "bottom_bits_per_code",
                             "total_bits", "reconstruction_mse"]
    for row in rows:  # each level's bits per code over its positions add up to the image's total
        total = sum(float(row[f"{level}_bits_per_code"]) * h * w for level, (h, w) in SHAPES.items())
        assert float(row["total_bits"]) == pytest.approx(total, rel=1e-6)

    assert checkpoint_stage(root / "middle") == "middle_prior"
    out = ok("scripts/evaluate.py", "--ckpt", root / "middle", "--codes", root / "codes.lmdb", "--json",
             root / "eval.json", in_process=True)  # no stage given: the checkpoint's, a prior
    assert out.splitlines()[-1].startswith("held-out bits/code: ")
    out = ok("scripts/evaluate.py", "samples", *model_options(root), "--data", root / "images", "--per-class", "2",
             "--classifier-steps", "2", "--json", root / "eval.json", in_process=True)
    assert out.splitlines()[-1].startswith("CAS: ")
    results = read_evaluation(root)
    assert results["middle_prior"]["level"] == "middle" and "cas" in results["samples"]

    ok("scripts/report.py", root, "--out", tmp_path / "report.html", in_process=True)
    page = (tmp_path / "report.html").read_text()
    sections = [page.index(f"<h2>Run {root / name}</h2>") for name in ("vqvae", "top", "middle", "bottom")]
    assert sections == sorted(sections) and "Codebook usage" in page
    counts = code_counts(CodeDataset(root / "codes.lmdb"))  # what the report's histograms show: every level
    records = len(CodeDataset(root / "codes.lmdb"))
    assert {level: int(count.sum()) for level, count in counts.items()} == {
        level: records * h * w for level, (h, w) in SHAPES.items()}


def refused_command(script, root, out, order):
    """`script` run on the pipeline with the priors in `order`, its outputs under `out`."""
    model = model_options(root, *order)
    image = root / "images" / "0" / "0.png"
    return {"complete.py": [image, *model, "--out-dir", out],
            "score.py": [image, *model, "--label", "0", "--out", out / "scores.csv"],
            "evaluate.py": ["samples", *model, "--data", root / "images", "--json", out / "eval.json"]}[script]


@pytest.mark.parametrize("script", ["complete.py", "score.py", "evaluate.py"])
@pytest.mark.parametrize("order, message", [
    (("middle", "top", "bottom"), "is not a top prior (its level: middle): give the priors top first"),
    (("top", "bottom"), "has 3 levels (top, middle, bottom): give one prior per level, top first, not 2"),
])
def test_a_prior_list_that_does_not_fit_is_refused_by_every_script(pipeline_dir, tmp_path, script, order, message):
    out = tmp_path / "out"
    result = run_in_process(f"scripts/{script}", *refused_command(script, pipeline_dir, out, order))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


@pytest.mark.parametrize("script", ["complete.py", "score.py"])
def test_images_given_after_priors_are_refused_with_the_reason(pipeline_dir, tmp_path, script):
    """--priors takes every path after it: images there are priors to argparse, and the command
    says so instead of failing on a missing image or a fourth prior."""
    image = pipeline_dir / "images" / "0" / "0.png"
    result = run_in_process(f"scripts/{script}", *model_options(pipeline_dir), image, "--label", "0",
                            *(["--out-dir", tmp_path / "out"] if script == "complete.py" else ["--out", tmp_path / "s.csv"]))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "(--priors takes every path after it: give them before --priors)" in result.stderr
