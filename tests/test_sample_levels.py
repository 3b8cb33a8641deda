"""Sampling a pipeline of any number of levels (`sample.py --priors TOP [MIDDLE ...] BOTTOM`): a tiny
three-level pipeline drawn through the script, level by level; --priors of two levels draws what
--top --bottom draws; the refusals of a prior list that does not fit the VQ-VAE, each in one line
before anything is written."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from launch import ok, run_in_process
from pipelines.infer.generation import generate, load_pipeline, sample_keys

SIZE = 32  # three levels of stride 16, 8 and 4: grids 2x2, 4x4 and 8x8
SHAPES = {"top": (2, 2), "middle": (4, 4), "bottom": (8, 8)}


@pytest.fixture(scope="module")
def three_levels(tiny_pipeline, tmp_path_factory):
    """A tiny untrained three-level pipeline, laid out as tiny_pipeline's two levels are: a random
    VQ-VAE with levels=3 (vqvae/), its code database, and random top, middle and bottom priors that
    fit it (top/, middle/, bottom/), the top one class-conditional."""
    from pipelines.infer.extract import extract_with_vqvae
    from pipelines.store.checkpoint import CHECKPOINT_NAME, save_checkpoint
    from pipelines.store.codes import read_metadata
    from pipelines.store.provenance import PriorProvenance, prior_fields
    from prior import PixelSNAIL, PixelSNAILConfig
    from vqvae import VQVAE2, VQVAE2Config

    root = tmp_path_factory.mktemp("three_level_pipeline")
    torch.manual_seed(0)
    config = VQVAE2Config(levels=3, channels=8, res_channels=4, n_res_blocks=1, top_codes=8, middle_codes=8,
                          bottom_codes=8, code_dim=4)
    save_checkpoint(root / "vqvae" / CHECKPOINT_NAME, VQVAE2(config).state_dict(), "vqvae2", config, step=1,
                    image_size=SIZE)
    extract_with_vqvae(root / "vqvae", str(tiny_pipeline / "images"), root / "codes.lmdb")
    metadata = read_metadata(root / "codes.lmdb")
    small = dict(channels=8, n_blocks=1, n_res_blocks=1, kernel_size=2, key_channels=4, value_channels=4,
                 embed_channels=4, cond_channels=4, cond_res_blocks=1, dropout=0.0)
    for level in SHAPES:
        provenance = PriorProvenance.of_database(metadata, level)
        prior = PixelSNAILConfig(**prior_fields(provenance), **small, attention=level == "top")
        save_checkpoint(root / level / CHECKPOINT_NAME, PixelSNAIL(prior).state_dict(), "pixelsnail", prior, step=1,
                        **provenance.to_extra())
    return root


def priors(root, *levels):
    return [str(root / level) for level in levels]


def test_three_levels_sample_through_the_script(three_levels, tmp_path):
    """--priors top middle bottom: samples.npz holds every level's codes at its grid, the PNGs and
    --save-codes likewise, and the codes are those generate() draws from the same keys."""
    root = three_levels
    out = tmp_path / "samples"
    ok("scripts/sample.py", "--vqvae", str(root / "vqvae"), "--priors", *priors(root, *SHAPES), "--n", "3",
       "--label", "1", "--batch-size", "2", "--out-dir", str(out), "--precision", "fp32", in_process=True)
    with np.load(out / "samples.npz", allow_pickle=False) as samples:
        assert sorted(samples.files) == ["bottom_codes", "images", "labels", "middle_codes", "top_codes"]
        assert samples["images"].shape == (3, SIZE, SIZE, 3) and samples["labels"].tolist() == [1, 1, 1]
        for level, shape in SHAPES.items():
            assert samples[f"{level}_codes"].shape == (3, *shape) and samples[f"{level}_codes"].dtype == np.uint16
        codes = [torch.from_numpy(samples[f"{level}_codes"].astype(np.int64)) for level in SHAPES]
    assert Image.open(out / "000002_label1.png").size == (SIZE, SIZE)

    pipeline = load_pipeline(root / "vqvae", *priors(root, *SHAPES))
    assert pipeline.levels == ("top", "middle", "bottom") and len(pipeline.middle) == 1
    _, *drawn = generate(pipeline, 3, 1, generator=sample_keys(0, range(3), "cpu"))
    for level_codes, expected in zip(codes, drawn):
        assert torch.equal(level_codes, expected)

    ok("scripts/sample.py", "--vqvae", str(root / "vqvae"), "--priors", *priors(root, *SHAPES), "--n", "2",
       "--label", "0", "--out", str(tmp_path / "grid.png"), "--save-codes", str(tmp_path / "codes.safetensors"),
       "--precision", "fp32", in_process=True)
    saved = load_file(tmp_path / "codes.safetensors")
    assert {name: tuple(value.shape) for name, value in saved.items()} == {
        f"{level}_codes": (2, *shape) for level, shape in SHAPES.items()}


def test_each_level_is_conditioned_on_the_level_above(three_levels):
    """The middle prior draws given the top codes and the bottom given the middle: changing the
    codes above changes the draw below (same keys)."""
    pipeline = load_pipeline(three_levels / "vqvae", *priors(three_levels, *SHAPES))
    keys = sample_keys(3, range(4), "cpu").at_level("middle")
    labels = torch.zeros(4, dtype=torch.long)
    top = torch.zeros(4, *SHAPES["top"], dtype=torch.long)
    with torch.no_grad():
        given_zeros = pipeline.middle[0].sample(4, labels, top, keys)
        given_other = pipeline.middle[0].sample(4, labels, top + 5, keys)
    assert not torch.equal(given_zeros, given_other)
    assert pipeline.middle[0].config.cond_shape == SHAPES["top"]
    assert pipeline.bottom.config.cond_shape == SHAPES["middle"]


def test_two_levels_through_priors_draw_what_top_and_bottom_draw(tiny_pipeline, tmp_path):
    """--priors TOP BOTTOM is --top TOP --bottom BOTTOM: same samples.npz keys and arrays."""
    root = tiny_pipeline
    common = ["--vqvae", str(root / "vqvae"), "--n", "3", "--label", "1", "--precision", "fp32"]
    ok("scripts/sample.py", *common, "--top", str(root / "top"), "--bottom", str(root / "bottom"),
       "--out-dir", str(tmp_path / "flags"), in_process=True)
    ok("scripts/sample.py", *common, "--priors", *priors(root, "top", "bottom"), "--out-dir", str(tmp_path / "list"),
       in_process=True)
    with np.load(tmp_path / "flags" / "samples.npz") as flags, np.load(tmp_path / "list" / "samples.npz") as listed:
        assert sorted(flags.files) == sorted(listed.files) == ["bottom_codes", "images", "labels", "top_codes"]
        for name in flags.files:
            assert np.array_equal(flags[name], listed[name])


@pytest.mark.parametrize("order, message", [
    (("middle", "top", "bottom"), "is not a top prior (its level: middle): give the priors top first "
                                  "(top, middle, bottom)"),
    (("top", "bottom", "middle"), "is not a middle prior (its level: bottom)"),
    (("top", "bottom"), "has 3 levels (top, middle, bottom): give one prior per level, top first, not 2"),
    (("top", "middle", "bottom", "bottom"), "give one prior per level, top first, not 4"),
])
def test_a_prior_list_that_does_not_fit_is_refused_before_anything_is_written(three_levels, tmp_path, order, message):
    out = tmp_path / "samples"
    result = run_in_process("scripts/sample.py", "--vqvae", str(three_levels / "vqvae"), "--priors",
                            *priors(three_levels, *order), "--label", "0", "--out-dir", str(out))
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not out.exists()


def test_a_prior_of_another_level_count_is_refused(three_levels, tiny_pipeline, tmp_path):
    """A two-level database's top prior is no top prior of a three-level VQ-VAE (nor the reverse)."""
    out = tmp_path / "samples"
    result = run_in_process("scripts/sample.py", "--vqvae", str(three_levels / "vqvae"), "--priors",
                            str(tiny_pipeline / "top"), *priors(three_levels, "middle", "bottom"), "--label", "0",
                            "--out-dir", str(out))
    assert result.returncode == 2 and "is not a top prior (its level: top of 2 levels; the VQ-VAE has 3)" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--top", "t"], "give the priors as --priors or as --top --bottom, not both (got --priors and --top)"),
    (["--bottom", "b"], "not both (got --priors and --bottom)"),
])
def test_priors_with_top_or_bottom_is_refused(three_levels, tmp_path, extra, message):
    result = run_in_process("scripts/sample.py", "--vqvae", str(three_levels / "vqvae"), "--priors",
                            *priors(three_levels, *SHAPES), *extra, "--out-dir", str(tmp_path / "samples"))
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "samples").exists()


def test_two_flags_still_need_both(tiny_pipeline, tmp_path):
    result = run_in_process("scripts/sample.py", "--vqvae", str(tiny_pipeline / "vqvae"), "--top",
                            str(tiny_pipeline / "top"), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "missing --bottom" in result.stderr
