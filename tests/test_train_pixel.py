"""Training, checkpoints, exact resume, and the command-line scripts, on tiny generated data."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from launch import launch_command, run_in_process, run_script
from pipelines.data.datasets import to_model_range
from pipelines.store.checkpoint import CheckpointError, load_checkpoint, load_pixelsnail, save_checkpoint
from pipelines.train.pixels import TrainConfig, train
from prior import PixelSNAIL, get_preset

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(image_folder, out, **changes):
    fields = dict(data=str(image_folder), out=str(out), preset="tiny", steps=6, precision="fp32",
                  eval_every=3, eval_batches=1, checkpoint_every=2, n_samples=2)
    return TrainConfig(**{**fields, **changes})


def test_a_few_steps_lower_the_loss(image_folder):
    from pipelines.data.datasets import load_dataset

    torch.manual_seed(0)
    images = torch.stack([load_dataset(str(image_folder), "train", 8)[i][0] for i in range(16)])
    x = to_model_range(images)
    model = PixelSNAIL(get_preset("tiny").model)
    model.init_from_data(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.nll(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_resume_continues_exactly(image_folder, tmp_path):
    """Stopping at step 3 and resuming gives bit-identical weights: the data order, the dropout
    RNG, Adam, the EMA and the learning-rate schedule are all restored. (3 steps is mid-epoch.)"""
    train(tiny_config(image_folder, tmp_path / "straight", dropout=0.3))
    train(tiny_config(image_folder, tmp_path / "split", steps=3, dropout=0.3))
    train(tiny_config(image_folder, tmp_path / "split", steps=6, resume=True))
    for name in ("model.safetensors", "state/model.safetensors", "state/ema.safetensors"):
        straight, split = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert straight.keys() == split.keys()
        for key in straight:
            assert torch.equal(straight[key], split[key]), f"{name}:{key} differs after resume"


def test_a_run_is_not_overwritten_without_resume(image_folder, tmp_path):
    train(tiny_config(image_folder, tmp_path / "run", steps=2))
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(image_folder, tmp_path / "run", steps=4))


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = PixelSNAIL(get_preset("tiny").model)
    save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), "pixelsnail", model.config, step=7)
    loaded, extra = load_pixelsnail(tmp_path / "m.safetensors")
    assert extra == {"step": 7} and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)

    save_checkpoint(tmp_path / "other.safetensors", model.state_dict(), "vqvae2", model.config)
    with pytest.raises(CheckpointError, match="holds a 'vqvae2' model"):
        load_pixelsnail(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors", "pixelsnail")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing", "pixelsnail")


def rewrite_checkpoint_metadata(path, **changes):
    """The checkpoint at `path` with metadata fields changed (None: removed), weights kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    metadata = {k: v for k, v in {**metadata, **changes}.items() if v is not None}
    save_file(tensors, path, metadata=metadata)


def test_checkpoints_carry_a_format_version_and_their_stage_and_old_ones_load_as_before(tmp_path):
    from pipelines.store.checkpoint import FORMAT_VERSION, checkpoint_stage, read_metadata

    model = PixelSNAIL(get_preset("tiny").model)
    pixels, prior = tmp_path / "pixels.safetensors", tmp_path / "prior.safetensors"
    save_checkpoint(pixels, model.state_dict(), "pixelsnail", model.config, step=7)
    save_checkpoint(prior, model.state_dict(), "pixelsnail", model.config, step=7, level="bottom", codes={})
    metadata, _ = read_metadata(pixels)
    assert (metadata["format_version"], metadata["stage"]) == (str(FORMAT_VERSION), "pixels")
    assert checkpoint_stage(prior) == "bottom_prior"

    for path, stage in ((pixels, "pixels"), (prior, "bottom_prior")):  # written before format version 1
        rewrite_checkpoint_metadata(path, format_version=None, stage=None)
        assert "stage" not in read_metadata(path)[0] and checkpoint_stage(path) == stage
    loaded, extra = load_pixelsnail(pixels)
    assert extra == {"step": 7} and loaded.config == model.config

    rewrite_checkpoint_metadata(pixels, format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match=f"format_version {FORMAT_VERSION + 1}, newer than this code reads"):
        load_pixelsnail(pixels)
    with pytest.raises(CheckpointError, match="newer than this code reads"):
        checkpoint_stage(pixels)


def test_command_line_end_to_end(image_folder, tmp_path):
    """The refusals of a missing checkpoint and missing data as real command lines, the rest in this process."""
    run_dir = tmp_path / "run"
    common = ["--data", str(image_folder), "--out", str(run_dir), "--preset", "tiny", "--precision", "fp32"]
    result = run_in_process("scripts/train_pixelsnail.py", *common, "--steps", "4", "--eval-every", "2",
                            "--n-samples", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("test bits/dim: ")
    assert (run_dir / "samples.png").is_file() and (run_dir / "model.safetensors").is_file()
    assert Image.open(run_dir / "samples.png").size[0] > 8

    result = run_in_process("scripts/train_pixelsnail.py", *common, "--steps", "6", "--resume")
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stdout and "at step 4" in result.stdout

    result = run_in_process("scripts/evaluate.py", "--ckpt", str(run_dir), "--data", str(image_folder))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("test bits/dim: ") and 0 < float(last.split(": ")[1]) < 16

    result = run_script("scripts/evaluate.py", "--ckpt", str(tmp_path / "nowhere"), "--data", str(image_folder))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "checkpoint not found" in result.stderr

    result = run_in_process("scripts/train_pixelsnail.py", *common, "--steps", "4")
    assert result.returncode == 2 and "--resume" in result.stderr

    result = run_script("scripts/train_pixelsnail.py", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "not found" in result.stderr and result.stderr.strip().count("\n") == 0


def test_two_real_processes_on_cpu(image_folder, tmp_path):
    result = subprocess.run(
        launch_command(2, "scripts/train_pixelsnail.py", "--data", str(image_folder), "--out", str(tmp_path / "run"),
                       "--preset", "tiny", "--steps", "4", "--precision", "fp32", "--n-samples", "0"),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "2 process(es) on cpu" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("test bits/dim: ")


def test_evaluation_covers_the_whole_split_exactly():
    """Mean over every example, also when the last batch is partial."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    from pipelines.eval.stages import evaluate_bits

    torch.manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    model = PixelSNAIL(get_preset("tiny").model)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(TensorDataset(images, torch.zeros(10)), batch_size=4))
    expected = model.eval().nll(to_model_range(images)).double().mean().item()
    assert abs(evaluate_bits(model, loader, accelerator) - expected) < 1e-6
    first_two = model.nll(to_model_range(images[:8])).double().mean().item()
    assert abs(evaluate_bits(model, loader, accelerator, max_batches=2) - first_two) < 1e-6


def test_ema_decay_0_means_no_polyak_averaging(image_folder, tmp_path):
    """--ema-decay 0 is honoured (not replaced by the preset's decay): the run keeps no average, and
    model.safetensors holds the trained weights themselves."""
    run_dir = tmp_path / "run"
    result = run_in_process("scripts/train_pixelsnail.py", "--data", str(image_folder), "--out", str(run_dir),
                            "--preset", "tiny", "--steps", "3", "--precision", "fp32", "--n-samples", "0",
                            "--ema-decay", "0")
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "state" / "progress.json").read_text())["train_config"]["ema_decay"] == 0
    assert not (run_dir / "state" / "ema.safetensors").exists()
    written, trained = load_file(run_dir / "model.safetensors"), load_file(run_dir / "state" / "model.safetensors")
    assert written.keys() == trained.keys()
    assert all(torch.equal(written[key], trained[key]) for key in trained)


def test_the_final_test_bits_are_computed_in_fp32_as_evaluate_does(image_folder, tmp_path):
    """Trained under bf16 autocast, the trainer reports its final test bits/dim in fp32: the very
    number scripts/evaluate.py prints for the checkpoint (same batches). The trainer runs in a process
    of its own: accelerate fixes the precision once per process, and tests in this one run in fp32."""
    run_dir = tmp_path / "run"
    trained = run_script("scripts/train_pixelsnail.py", "--data", str(image_folder), "--out", str(run_dir),
                         "--preset", "tiny", "--steps", "3", "--precision", "bf16", "--n-samples", "0")
    assert trained.returncode == 0, trained.stderr
    assert "precision bf16" in trained.stdout
    evaluated = run_in_process("scripts/evaluate.py", "--ckpt", str(run_dir), "--data", str(image_folder),
                               "--batch-size", "8")
    assert evaluated.returncode == 0, evaluated.stderr
    assert trained.stdout.strip().splitlines()[-1] == evaluated.stdout.strip().splitlines()[-1]
