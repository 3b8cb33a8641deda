"""Completion: the top rows of an image kept exactly, the rest sampled (scripts/complete.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from launch import ok, run_in_process, run_script
from pipelines.infer.completion import covering_rows, kept_rows
from pipelines.store.checkpoint import save_checkpoint
from prior import PixelSNAIL, PixelSNAILConfig

PAD = 2  # write_image_grid's padding between cells


def cell(grid, k, size):
    """Cell k of a one-row image grid, (size, size, 3) uint8."""
    left = PAD + k * (size + PAD)
    return grid[PAD : PAD + size, left : left + size]


def test_keep_is_a_fraction_or_a_row_count():
    assert kept_rows("0.5", 32) == 16 and kept_rows("0.3", 32) == 9 and kept_rows("1.0", 32) == 32
    assert kept_rows("12", 32) == 12 and kept_rows("0", 32) == 0 and kept_rows("32", 32) == 32
    assert kept_rows("1", 32) == 32 and kept_rows("1", 8) == 8 and kept_rows("0.0", 32) == 0  # 1 is 1.0: all rows
    assert kept_rows("2", 32) == 2 and kept_rows("0.03125", 32) == 1  # one row is a fraction
    for bad, message in (("33", r"whole row count in \[2, 32\]"), ("1.5", "fraction"), ("-1", "row count"),
                         ("nan", "fraction"), ("half", "a fraction of the rows"), ("2.0", "whole row count")):
        with pytest.raises(ValueError, match=message):
            kept_rows(bad, 32)
    assert covering_rows(8, 64, 8) == 1 and covering_rows(9, 64, 8) == 2 and covering_rows(0, 64, 16) == 0


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("complete")
    config = PixelSNAILConfig(shape=(8, 8), channels=8, n_blocks=1, n_res_blocks=1, key_channels=4, value_channels=4,
                              n_mixtures=2, dropout=0.0)
    torch.manual_seed(0)
    save_checkpoint(root / "pixels.safetensors", PixelSNAIL(config).state_dict(), "pixelsnail", config)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / "c.png")  # resized, cropped
    return root


def test_pixel_completions_keep_the_kept_rows_exactly(pixel_model, tmp_path):
    root = pixel_model
    out = ok("scripts/complete.py", "--ckpt", str(root / "pixels.safetensors"), str(root / "images"),
             str(root / "c.png"), "--keep", "0.5", "--n", "3", "--out-dir", str(tmp_path), "--device", "cpu",
             in_process=True)
    assert "wrote 3 grids of 3 completions (kept 4 of 8 rows)" in out
    names = sorted(path.name for path in tmp_path.glob("*.png"))
    assert names == ["0000_a.png", "0001_b.png", "0002_c.png"]
    for name in names:
        grid = np.asarray(Image.open(tmp_path / name))
        assert grid.shape == (8 + 2 * PAD, 5 * (8 + PAD) + PAD, 3)
        original, kept = cell(grid, 0, 8), cell(grid, 1, 8)
        assert np.array_equal(kept[:4], original[:4]) and (kept[4:] == 128).all()
        completions = [cell(grid, k, 8) for k in (2, 3, 4)]
        assert all(np.array_equal(completion[:4], original[:4]) for completion in completions)
        assert not all(np.array_equal(completion[4:], original[4:]) for completion in completions)
    assert np.array_equal(cell(np.asarray(Image.open(tmp_path / "0000_a.png")), 0, 8),
                          np.asarray(Image.open(root / "images" / "a.png")))


def test_complete_refuses_bad_input_in_one_line_and_writes_nothing(pixel_model, tmp_path):
    """The first case as a real command line, the others in this process."""
    root = pixel_model
    base = ["scripts/complete.py", "--ckpt", str(root / "pixels.safetensors"), "--out-dir", str(tmp_path / "out")]
    for run, extra, message in ((run_script, [str(root / "missing.png")], "image not found"),
                                (run_in_process, [str(root / "images"), "--keep", "9"], "row count in [2, 8]"),
                                (run_in_process, [str(root / "images"), "--top-k", "3"], "code mode only"),
                                (run_in_process, [str(root / "images"), "--label", "1"], "not class-conditional"),
                                (run_in_process, [str(root / "images"), "--vqvae", str(root)], "give either --ckpt")):
        result = run(*base, *extra)
        assert result.returncode == 2 and message in result.stderr
        assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()
