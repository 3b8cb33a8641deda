"""The VQ-VAE trainer and its script on a tiny generated image folder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from launch import launch_command, run_in_process
from pipelines.store.checkpoint import load_vqvae
from pipelines.store.run_files import read_log
from pipelines.train.vqvae import VQVAETrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """30 smooth 16x16 images: colour gradients, something a tiny VQ-VAE can learn."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 16)
    for k in range(30):
        start, end = rng.uniform(0, 255, size=(2, 3))
        image = start + (end - start) * ramp[None, :, None] * ramp[:, None, None]
        Image.fromarray(np.broadcast_to(image, (16, 16, 3)).astype(np.uint8)).save(folder / f"{k:02d}.png")
    return folder


def tiny(image_folder, out, **changes):
    fields = dict(data=str(image_folder), out=str(out), preset="cpu-small", size=16, steps=4, batch_size=4,
                  precision="fp32", eval_every=2, eval_batches=1, checkpoint_every=2, n_images=2)
    return VQVAETrainConfig(**{**fields, **changes})


def test_checkpoint_carries_config_and_image_size(image_folder, tmp_path):
    """(That training lowers the error is tested on the model itself in test_vqvae.py.)"""
    train(tiny(image_folder, tmp_path / "run", steps=2))
    model, extra = load_vqvae(tmp_path / "run")
    assert extra["image_size"] == 16 and extra["step"] == 2
    top, bottom = model.encode(torch.zeros(1, 3, 16, 16))
    assert top.shape == (1, 2, 2) and bottom.shape == (1, 4, 4)


def test_the_trainer_logs_what_evaluate_reports(image_folder, tmp_path):
    """One VQ-VAE evaluator: the trainer's final evaluation (the whole test split) and `evaluate.py
    vqvae` on the same split give the same figures."""
    train(tiny(image_folder, tmp_path / "run", steps=2))
    final = [record for record in read_log(tmp_path / "run") if record.get("final")][-1]
    run_in_process("scripts/evaluate.py", "vqvae", "--ckpt", str(tmp_path / "run"), "--data", str(image_folder),
                   "--json", str(tmp_path / "eval.json"))
    reported = json.loads((tmp_path / "eval.json").read_text())["vqvae"]
    for key in ("mse", "top_usage", "bottom_usage", "top_perplexity", "bottom_perplexity"):
        assert final[key] == pytest.approx(reported[key], rel=1e-6), key
    assert reported["images"] == 3  # every 10th of the 30 images is held out


def test_three_levels_log_every_level_under_its_name_as_evaluate_reports_it(image_folder, tmp_path):
    train(tiny(image_folder, tmp_path / "run", steps=2, levels=3))
    model, _ = load_vqvae(tmp_path / "run")
    assert model.config.levels == 3
    assert [tuple(c.shape) for c in model.encode(torch.zeros(1, 3, 16, 16))] == [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    final = [record for record in read_log(tmp_path / "run") if record.get("final")][-1]
    run_in_process("scripts/evaluate.py", "vqvae", "--ckpt", str(tmp_path / "run"), "--data", str(image_folder),
                   "--json", str(tmp_path / "eval.json"))
    reported = json.loads((tmp_path / "eval.json").read_text())["vqvae"]
    per_level = [f"{level}_{figure}" for level in ("top", "middle", "bottom") for figure in ("usage", "perplexity")]
    for key in ("mse", *per_level):
        assert final[key] == pytest.approx(reported[key], rel=1e-6), key
    with pytest.raises(ValueError, match=r"--levels 2 differs from the run's levels 3"):
        train(tiny(image_folder, tmp_path / "run", steps=4, levels=2, resume=True))
    with pytest.raises(ValueError, match=r"--size must be a multiple of 16 and >= 16 "
                                         r"\(three levels of stride 4, 8 and 16\), got 24"):
        train(tiny(image_folder, tmp_path / "other", size=24, levels=3))
    assert not (tmp_path / "other").exists()


def test_resume_continues_exactly(image_folder, tmp_path):
    train(tiny(image_folder, tmp_path / "straight", steps=6))
    train(tiny(image_folder, tmp_path / "split", steps=3))
    train(tiny(image_folder, tmp_path / "split", steps=6, resume=True))
    straight, split = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], split[key]), f"{key} differs after resume"


def test_bad_sizes_are_refused():
    for size in (0, 12, -8):
        with pytest.raises(ValueError, match="multiple of 8"):
            VQVAETrainConfig(size=size)


def test_command_line_and_two_processes(image_folder, tmp_path):
    args = ["scripts/train_vqvae.py", "--data", str(image_folder), "--preset", "cpu-small", "--size", "16",
            "--steps", "4", "--batch-size", "4", "--precision", "fp32", "--eval-every", "2"]
    single = run_in_process(*args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    assert single.stdout.strip().splitlines()[-1].startswith("test reconstruction mse: ")
    assert (tmp_path / "one" / "reconstructions.png").is_file()

    double = subprocess.run(
        launch_command(2, *args, "--out", str(tmp_path / "two")),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert double.returncode == 0, double.stderr
    assert "2 process(es) on cpu" in double.stdout

    bad = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "bad"), "--size", "20"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "multiple of 8" in bad.stderr and "Traceback" not in bad.stderr


def test_a_short_run_lowers_the_reconstruction_error_on_the_folder(image_folder, fit_vqvae):
    """60 full-batch Adam steps on 8 images of the folder at least halve the reconstruction error."""
    from pipelines.data.datasets import load_dataset, to_model_range
    from vqvae import VQVAE2, VQVAE2Config

    dataset = load_dataset(str(image_folder), "train", 16)
    images = to_model_range(torch.stack([dataset[i][0] for i in range(8)]))
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(channels=32, res_channels=16, n_res_blocks=1, top_codes=32, bottom_codes=32, code_dim=16))
    errors = fit_vqvae(model, images, lr=2e-3)
    assert errors[-1] < 0.5 * errors[0], errors
