"""Damaged weights (NaN or Inf from bit rot or a bad copy) are refused by the one checkpoint reader,
in one line naming the file and the count of bad values, for every kind of model and every script
that loads one: they once gave a traceback in sampling, `nan` figures with exit 0, and a code
database extracted from NaN weights."""

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from pipelines.store.checkpoint import CHECKPOINT_NAME, CheckpointError, load_pixelsnail, save_checkpoint
from prior import PixelSNAIL, PixelSNAILConfig
from test_inputs import assert_refused, script  # noqa: F401 (script: a fixture)


def damage(run_dir, out, value, count):
    """A copy of the run directory's checkpoint in `out`, `count` values of its first float tensor set to `value`."""
    source = run_dir / CHECKPOINT_NAME
    with safe_open(source, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    name = next(name for name, tensor in tensors.items() if tensor.is_floating_point() and tensor.numel() >= count)
    tensors[name].view(-1)[:count] = value
    out.mkdir(parents=True)
    save_file(tensors, out / CHECKPOINT_NAME, metadata=metadata)
    return out


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    """A tiny random pixel-mode PixelSNAIL's run directory, 8x8 images."""
    run_dir = tmp_path_factory.mktemp("pixels")
    config = PixelSNAILConfig(shape=(8, 8), channels=8, n_blocks=1, n_res_blocks=1, key_channels=4, value_channels=4,
                              n_mixtures=2)
    save_checkpoint(run_dir / CHECKPOINT_NAME, PixelSNAIL(config).state_dict(), "pixelsnail", config, step=1)
    return run_dir


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["NaN", "Inf", "-Inf"])
def test_the_checkpoint_reader_counts_the_bad_values_and_names_the_file(pixel_model, tmp_path, value):
    damaged = damage(pixel_model, tmp_path / "damaged", value, count=3)
    with pytest.raises(CheckpointError) as excinfo:
        load_pixelsnail(damaged)
    message = str(excinfo.value)
    assert "\n" not in message and str(damaged / CHECKPOINT_NAME) in message
    assert "3 weight value(s) are NaN or infinite, in 1 tensor(s)" in message
    load_pixelsnail(pixel_model)  # the undamaged file loads


def test_every_script_refuses_damaged_weights_of_every_kind(tiny_pipeline, pixel_model, script, tmp_path):
    """A VQ-VAE with NaN (extraction writes no database; evaluation and sampling refuse it), a prior
    with +Inf (evaluation, sampling), a pixel model with -Inf (evaluation, scoring, completion)."""
    tiny = tiny_pipeline
    vqvae = damage(tiny / "vqvae", tmp_path / "vqvae", float("nan"), count=2)
    top = damage(tiny / "top", tmp_path / "top", float("inf"), count=5)
    pixels = damage(pixel_model, tmp_path / "pixels", -float("inf"), count=1)
    images = tiny / "images"
    cases = [
        (vqvae, 2, ["extract_codes.py", "--vqvae", vqvae, "--data", images, "--out", tmp_path / "codes.lmdb"]),
        (vqvae, 2, ["evaluate.py", "vqvae", "--ckpt", vqvae, "--data", images]),
        (vqvae, 2, ["sample.py", "--vqvae", vqvae, "--top", tiny / "top", "--bottom", tiny / "bottom",
                    "--out", tmp_path / "a.png"]),
        (top, 5, ["evaluate.py", "prior", "--ckpt", top, "--codes", tiny / "codes.lmdb"]),
        (top, 5, ["sample.py", "--vqvae", tiny / "vqvae", "--top", top, "--bottom", tiny / "bottom",
                  "--out", tmp_path / "b.png"]),
        (pixels, 1, ["evaluate.py", "pixels", "--ckpt", pixels, "--data", images]),
        (pixels, 1, ["score.py", "--ckpt", pixels, "--data", images, "--out", tmp_path / "scores.csv"]),
        (pixels, 1, ["complete.py", "--ckpt", pixels, images / "test", "--out-dir", tmp_path / "completed"]),
    ]
    for damaged, count, (name, *args) in cases:
        assert_refused(script(name, *args), damaged / CHECKPOINT_NAME,
                       f"{count} weight value(s) are NaN or infinite")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pixels", "top", "vqvae"]  # nothing written

