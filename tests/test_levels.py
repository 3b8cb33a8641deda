"""Priors at every level of an N-level code database: provenance, level names and indices, the
model inputs of each level, the FFHQ presets, and a tiny three-level run end to end."""

import pytest

from pipelines.data.codes import database_level
from pipelines.store.checkpoint import CheckpointError
from pipelines.store.provenance import PriorProvenance, check_fits, prior_fields

TWO = {"top_shape": [2, 2], "bottom_shape": [4, 4], "top_codes": 8, "bottom_codes": 16, "n_classes": 3,
       "vqvae_sha256": "ab", "image_size": 16, "source": {"split": "train"}}
THREE = {"levels": 3, "top_shape": [2, 2], "middle_shape": [4, 4], "bottom_shape": [8, 8], "top_codes": 8,
         "middle_codes": 16, "bottom_codes": 32, "n_classes": 1, "vqvae_sha256": "cd", "image_size": 32,
         "source": {"split": "train"}}


def test_a_two_level_record_is_stored_as_before():
    record = PriorProvenance.of_database(TWO, "bottom")
    # the fields a checkpoint held before the number of levels became a parameter, and no others
    before = {name: TWO[name] for name in ("top_shape", "bottom_shape", "top_codes", "bottom_codes", "n_classes",
                                           "vqvae_sha256", "image_size")}
    codes = record.to_extra()["codes"]
    assert {name: list(value) if isinstance(value, tuple) else value for name, value in codes.items()
            if name != "database"} == before
    assert record == PriorProvenance("bottom", "ab", 16, (2, 2), (4, 4), 8, 16, 3, record.database)
    assert PriorProvenance.from_extra({"level": "bottom", "codes": {**before, "database": None}}, "p") == \
        PriorProvenance("bottom", "ab", 16, (2, 2), (4, 4), 8, 16, 3)
    assert (record.index, record.levels) == (1, 2)


@pytest.mark.parametrize("level, index, shape, n_codes, cond", [
    ("top", 0, (2, 2), 8, (None, None)),
    ("middle", 1, (4, 4), 16, ((2, 2), 8)),
    ("bottom", 2, (8, 8), 32, ((4, 4), 16)),
])
def test_each_level_of_three_is_conditioned_on_the_level_above(level, index, shape, n_codes, cond):
    record = PriorProvenance.of_database(THREE, level)
    assert (record.index, record.levels) == (index, 3)
    assert prior_fields(record) == {"shape": shape, "n_codes": n_codes, "n_classes": 0, "cond_shape": cond[0],
                                    "cond_codes": cond[1]}
    assert PriorProvenance.from_extra(record.to_extra(), "p") == record


def test_a_prior_of_one_level_does_not_fit_another():
    from prior import PixelSNAILConfig

    middle = PixelSNAILConfig(**prior_fields(PriorProvenance.of_database(THREE, "middle")), channels=8)
    check_fits(middle, PriorProvenance.of_database(THREE, "middle"), "the database")
    with pytest.raises(ValueError, match=r"^the bottom prior has shape=\(4, 4\) but the database has \(8, 8\)$"):
        check_fits(middle, PriorProvenance.of_database(THREE, "bottom"), "the database")


def test_a_record_of_a_level_its_database_lacks_is_refused():
    extra = PriorProvenance.of_database(TWO, "top").to_extra()
    with pytest.raises(CheckpointError, match=r"^p has a damaged record of its code database .*'middle'"):
        PriorProvenance.from_extra({**extra, "level": "middle"}, "p")


@pytest.mark.parametrize("level, levels, name", [
    ("top", 2, "top"), ("0", 2, "top"), ("1", 2, "bottom"), ("middle", 3, "middle"), ("1", 3, "middle"),
    ("2", 3, "bottom"), ("3", 5, "level3"), ("level4", 5, "level4"),
])
def test_a_level_is_named_or_counted_from_the_top(level, levels, name):
    assert database_level(level, levels, "codes.lmdb") == name


@pytest.mark.parametrize("level, levels", [("middle", 2), ("2", 2), ("3", 3), ("-1", 3), ("top", 4), ("upper", 3)])
def test_a_level_the_database_lacks_is_refused_in_one_line(level, levels):
    with pytest.raises(ValueError, match=rf"^--level {level}: codes.lmdb holds {levels} levels of codes \(.*\); "
                                         rf"give one of them or an index 0 \(top\) to {levels - 1} \(bottom\)$"):
        database_level(level, levels, "codes.lmdb")


# -- the FFHQ presets: each level's prior sampled exactly by the cache (their causality with their
# conditions: tests/test_causality.py, which checks every preset)


def test_the_cached_sampler_draws_what_the_naive_one_draws_at_every_level():
    """A chain of three tiny priors shaped by the FFHQ presets: the top draws its grid, each level
    below draws its own given the grid drawn above it, cached and naive alike."""
    import torch

    from prior import PixelSNAIL, get_preset
    from prior.sampling import sample_cached

    tiny = dict(channels=8, res_channels=8, n_res_blocks=1, key_channels=4, value_channels=8, n_heads=2,
                embed_channels=4, cond_channels=4, cond_res_blocks=1, out_res_blocks=1, kernel_size=3, dropout=0.0)
    above = None
    for level in ("top", "middle", "bottom"):
        name = f"vqvae2-ffhq-{level}"
        fields = prior_fields(PriorProvenance.of_database({**THREE, "bottom_shape": [4, 8]}, level))  # 32 positions
        torch.manual_seed(0)
        model = PixelSNAIL(get_preset(name, **fields, **tiny).model).eval()
        with torch.no_grad():
            for parameter in model.parameters():  # every weight matters, as after training
                parameter.add_(0.1 * torch.randn_like(parameter))
        naive = model.sample(2, None, above, torch.Generator().manual_seed(1), cache=False)
        cached = sample_cached(model, 2, None, above, torch.Generator().manual_seed(1))
        assert naive.shape == (2, *fields["shape"]) and torch.equal(cached, naive), level
        above = cached


# -- a tiny three-level pipeline: a VQ-VAE, its codes, and a prior of every level trained on them


@pytest.fixture(scope="module")
def three_level_codes(tmp_path_factory):
    """A tiny 3-level VQ-VAE's codes of the train split of 24 random 32x32 images: 2x2 top, 4x4
    middle and 8x8 bottom grids."""
    import torch
    from PIL import Image

    from pipelines.infer.extract import extract_with_vqvae
    from pipelines.store.checkpoint import save_checkpoint
    from vqvae import VQVAE2, VQVAE2Config

    root = tmp_path_factory.mktemp("three_levels")
    (root / "images").mkdir()
    for k in range(24):
        pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
        Image.fromarray(pixels.numpy()).save(root / "images" / f"{k:02d}.png")
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(levels=3, top_codes=8, middle_codes=16, bottom_codes=32, code_dim=4, channels=8,
                                res_channels=4, n_res_blocks=1)).eval()
    save_checkpoint(root / "vqvae" / "model.safetensors", model.state_dict(), "vqvae2", model.config, image_size=32)
    assert extract_with_vqvae(root / "vqvae", str(root / "images"), root / "codes.lmdb") == 21  # its train split
    return root / "codes.lmdb"


def prior_run(codes, out, level, **changes):
    from pipelines.train.priors import PriorTrainConfig

    fields = dict(codes=str(codes), out=str(out), level=level, batch_size=4, steps=2, precision="fp32",
                  eval_every=1000, eval_batches=1, checkpoint_every=1000, dropout=0.0)
    return PriorTrainConfig(**{**fields, **changes})


@pytest.mark.parametrize("level, name, shape, cond_shape", [
    ("top", "top", (2, 2), None), ("1", "middle", (4, 4), (2, 2)), ("bottom", "bottom", (8, 8), (4, 4)),
])
def test_a_prior_of_every_level_trains_on_a_three_level_database(three_level_codes, tmp_path, level, name, shape,
                                                                  cond_shape):
    import math

    from pipelines.store.checkpoint import load_pixelsnail
    from pipelines.train.priors import train

    assert math.isfinite(train(prior_run(three_level_codes, tmp_path / "run", level)))
    model, extra = load_pixelsnail(tmp_path / "run" / "model.safetensors")
    record = PriorProvenance.from_extra(extra, "the run")
    assert (record.level, record.levels, extra["codes"]["levels"]) == (name, 3, 3)  # an index is stored by name
    assert (model.config.shape, model.config.cond_shape) == (shape, cond_shape)
    check_fits(model.config, record, "its database")


@pytest.mark.parametrize("level", ["3", "level1", "upper"])
def test_a_level_the_database_lacks_is_refused_before_anything_is_written(three_level_codes, tmp_path, level):
    from pipelines.train.priors import train

    with pytest.raises(ValueError, match=rf"^--level {level}: .*codes.lmdb holds 3 levels of codes \(top, middle, "
                                         r"bottom\); give one of them or an index 0 \(top\) to 2 \(bottom\)$"):
        train(prior_run(three_level_codes, tmp_path / "run", level))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
