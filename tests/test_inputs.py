"""Bad inputs given to the scripts: checkpoints that are not ours, damaged, or of the other kind of
model; priors that do not fit their VQ-VAE; out-of-range labels, sizes and batch sizes; damaged
images. Each must end with exit status 2 and one line `error: ...` naming the problem, without a
traceback, and leave no output that a later run could take for a valid one.

The scripts run in this process (runpy, as `python scripts/X.py` would run them) on tiny models with
random weights; the case that needs a real process (a DataLoader worker's error) runs as a subprocess.
"""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from launch import run_in_process
from pipelines.data.datasets import DataError
from pipelines.errors import one_line
from pipelines.infer.generation import load_pipeline
from pipelines.store.checkpoint import CheckpointError, load_pixelsnail, load_vqvae, save_checkpoint
from pipelines.store.codes import CodeStoreError, file_sha256, read_metadata
from pipelines.train.pixels import TrainConfig, train
from prior import PixelSNAIL, PixelSNAILConfig, get_preset
from vqvae import VQVAE2, VQVAE2Config

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16  # VQ-VAE input: 2x2 top and 4x4 bottom code grids
N_CODES = 8
SMALL_PRIOR = dict(channels=8, n_blocks=1, n_res_blocks=1, kernel_size=2, key_channels=4, value_channels=4,
                   embed_channels=4, cond_channels=4, cond_res_blocks=1, dropout=0.0)


def save_image_file(path, pixels_hwc):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels_hwc).save(path)
    return path


def save_prior(path, level, vqvae_file, n_classes=2, **changes):
    """A random prior for `level` that fits the tiny VQ-VAE unless `changes` say otherwise."""
    grid = {"top": (2, 2), "bottom": (4, 4)}[level]
    fields = dict(shape=grid, n_codes=N_CODES, n_classes=n_classes, **SMALL_PRIOR)
    if level == "bottom":
        fields.update(cond_codes=N_CODES, cond_shape=(2, 2), attention=False)
    config = PixelSNAILConfig(**{**fields, **changes})
    codes = {"vqvae_sha256": file_sha256(vqvae_file), "image_size": IMAGE_SIZE, "top_shape": [2, 2],
             "bottom_shape": [4, 4], "top_codes": N_CODES, "bottom_codes": N_CODES, "n_classes": n_classes}
    save_checkpoint(path, PixelSNAIL(config).state_dict(), "pixelsnail", config, step=1, level=level, codes=codes)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Checkpoints of every kind: a VQ-VAE, fitting top/bottom priors (conditional and not), a pixel
    model; an image folder; and files that are not checkpoints of ours."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vqvae_config = VQVAE2Config(channels=8, res_channels=4, n_res_blocks=1, top_codes=N_CODES,
                                bottom_codes=N_CODES, code_dim=4)
    vqvae = root / "vqvae.safetensors"
    save_checkpoint(vqvae, VQVAE2(vqvae_config).state_dict(), "vqvae2", vqvae_config, step=1, image_size=IMAGE_SIZE)
    pixel_config = get_preset("tiny").model
    pixel = root / "pixel.safetensors"
    save_checkpoint(pixel, PixelSNAIL(pixel_config).state_dict(), "pixelsnail", pixel_config, step=1, data="x")

    whole = pixel.read_bytes()
    not_ours = {
        "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "empty file": b"",
        "truncated checkpoint": whole[: len(whole) // 2],
    }
    files = {name: root / f"{name.replace(' ', '_')}.safetensors" for name in not_ours}
    for name, content in not_ours.items():
        files[name].write_bytes(content)
    files["safetensors without our metadata"] = root / "plain.safetensors"
    save_file({"weight": torch.zeros(3)}, files["safetensors without our metadata"])
    files["torch.save file"] = root / "weights.pt"
    torch.save(PixelSNAIL(pixel_config).state_dict(), files["torch.save file"])

    images = root / "images"
    rng = np.random.default_rng(1)
    for k in range(12):
        save_image_file(images / f"{k:02d}.png", rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    return {
        "root": root, "vqvae": vqvae, "pixel": pixel, "images": images, "not_ours": files,
        "top": save_prior(root / "top.safetensors", "top", vqvae),
        "bottom": save_prior(root / "bottom.safetensors", "bottom", vqvae),
        "top_unconditional": save_prior(root / "top0.safetensors", "top", vqvae, n_classes=0),
        "bottom_unconditional": save_prior(root / "bottom0.safetensors", "bottom", vqvae, n_classes=0),
    }


@pytest.fixture
def script():
    """Runs scripts/<name> in this process as `python scripts/<name> args...` -> (exit status, stderr)."""

    def run(name, *args):
        result = run_in_process(f"scripts/{name}", *args)
        return result.returncode, result.stderr

    return run


def assert_refused(result, *fragments):
    """Exit status 2, no traceback, the last line of stderr `error: ...` holding every fragment."""
    status, stderr = result
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr
    for fragment in fragments:
        assert str(fragment) in last, last


def sample_args(models, out, **paths):
    chosen = {"vqvae": models["vqvae"], "top": models["top"], "bottom": models["bottom"], **paths}
    return ["--vqvae", chosen["vqvae"], "--top", chosen["top"], "--bottom", chosen["bottom"], "--n", 2,
            "--out", out]


# ------------------------------------------------------------------------------------------------
# Checkpoints that are not ours


NOT_OURS = ["random bytes", "empty file", "truncated checkpoint", "safetensors without our metadata",
            "torch.save file"]


@pytest.mark.parametrize("kind", NOT_OURS)
def test_evaluate_refuses_a_file_that_is_not_our_checkpoint(models, script, kind):
    bad = models["not_ours"][kind]
    assert_refused(script("evaluate.py", "--ckpt", bad, "--data", models["images"]), bad)


@pytest.mark.parametrize("role", ["vqvae", "top", "bottom"])
@pytest.mark.parametrize("kind", NOT_OURS)
def test_sample_refuses_a_file_that_is_not_our_checkpoint(models, script, tmp_path, kind, role):
    bad = models["not_ours"][kind]
    out = tmp_path / "samples.png"
    assert_refused(script("sample.py", *sample_args(models, out, **{role: bad})), bad)
    assert not out.exists()


@pytest.mark.parametrize("kind", NOT_OURS)
def test_extract_codes_refuses_a_file_that_is_not_our_checkpoint(models, script, tmp_path, kind):
    bad, out = models["not_ours"][kind], tmp_path / "codes.lmdb"
    assert_refused(script("extract_codes.py", "--vqvae", bad, "--data", models["images"], "--out", out), bad)
    assert not out.exists()


def test_messages_say_why_a_file_is_not_a_checkpoint(models):
    reasons = {
        "torch.save file": "torch.save",
        "truncated checkpoint": "not a readable safetensors checkpoint",
        "safetensors without our metadata": "not a checkpoint of this project",
    }
    for kind, reason in reasons.items():
        with pytest.raises(CheckpointError, match=reason):
            load_pixelsnail(models["not_ours"][kind])


@pytest.mark.parametrize("config_text, problem", [
    ("not json", "Expecting value"),
    ('{"shape": 8}', "PixelSNAILConfig"),
    ('{"channels": "many"}', "PixelSNAILConfig"),
    ('{"colour": "blue"}', "unknown PixelSNAILConfig fields"),
])
def test_damaged_config_metadata_is_named(tmp_path, config_text, problem):
    path = tmp_path / "damaged.safetensors"
    save_file({"weight": torch.zeros(1)}, path, metadata={"kind": "pixelsnail", "config": config_text})
    with pytest.raises(CheckpointError) as excinfo:
        load_pixelsnail(path)
    assert str(path) in str(excinfo.value) and problem in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


# ------------------------------------------------------------------------------------------------
# Checkpoints of the other kind of model


def test_evaluate_pixels_refuses_a_vqvae_and_a_code_prior(models, script):
    """The pixels stage, named: without a stage, evaluate.py evaluates what the checkpoint holds."""
    assert_refused(script("evaluate.py", "pixels", "--ckpt", models["vqvae"], "--data", models["images"]),
                   models["vqvae"], "'vqvae2' model, expected 'pixelsnail'")
    assert_refused(script("evaluate.py", "pixels", "--ckpt", models["top"], "--data", models["images"]),
                   models["top"], "code-mode prior")


@pytest.mark.parametrize("role, given, message", [
    ("vqvae", "pixel", "'pixelsnail' model, expected 'vqvae2'"),
    ("vqvae", "top", "'pixelsnail' model, expected 'vqvae2'"),
    ("top", "vqvae", "'vqvae2' model, expected 'pixelsnail'"),
    ("bottom", "vqvae", "'vqvae2' model, expected 'pixelsnail'"),
    ("top", "pixel", "is not a top prior (its level: none, a pixel model)"),
    ("bottom", "top", "is not a bottom prior (its level: top)"),
])
def test_sample_refuses_a_checkpoint_of_the_other_kind(models, script, tmp_path, role, given, message):
    out = tmp_path / "samples.png"
    assert_refused(script("sample.py", *sample_args(models, out, **{role: models[given]})), models[given], message)
    assert not out.exists()


def test_extract_codes_refuses_a_pixelsnail_checkpoint(models, script, tmp_path):
    out = tmp_path / "codes.lmdb"
    result = script("extract_codes.py", "--vqvae", models["pixel"], "--data", models["images"], "--out", out)
    assert_refused(result, models["pixel"], "expected 'vqvae2'")
    assert not out.exists()


def test_train_prior_refuses_a_checkpoint_given_as_code_database(models, script, tmp_path):
    out = tmp_path / "prior"
    result = script("train_prior.py", "--codes", models["vqvae"], "--out", out, "--steps", 1)
    assert_refused(result, models["vqvae"], "not an LMDB database")
    assert not out.exists()


def test_a_vqvae_checkpoint_without_its_image_size_is_refused(models, tmp_path):
    vqvae, _ = load_vqvae(models["vqvae"])
    save_checkpoint(tmp_path / "v.safetensors", vqvae.state_dict(), "vqvae2", vqvae.config, step=1)
    with pytest.raises(CheckpointError, match="does not record the image size"):
        load_pipeline(tmp_path / "v.safetensors", models["top"], models["bottom"])


# ------------------------------------------------------------------------------------------------
# Priors that do not fit the VQ-VAE (n_codes of the top prior: tests/test_pipeline.py)


@pytest.mark.parametrize("level, changes, message", [
    ("top", dict(shape=(3, 3)), "the top prior has shape=(3, 3) but the VQ-VAE"),
    ("bottom", dict(shape=(2, 2)), "the bottom prior has shape=(2, 2) but the VQ-VAE"),
    ("bottom", dict(n_codes=16), "the bottom prior has n_codes=16 but the VQ-VAE"),
    ("bottom", dict(cond_shape=(1, 1)), "the bottom prior has cond_shape=(1, 1) but the VQ-VAE"),
    ("bottom", dict(cond_codes=4), "the bottom prior has cond_codes=4 but the VQ-VAE"),
    ("bottom", dict(n_classes=3), "the bottom prior has n_classes=3 but the VQ-VAE"),
])
def test_sample_refuses_a_prior_that_does_not_fit_the_vqvae(models, script, tmp_path, level, changes, message):
    misfit = save_prior(tmp_path / "misfit.safetensors", level, models["vqvae"], **changes)
    out = tmp_path / "samples.png"
    assert_refused(script("sample.py", *sample_args(models, out, **{level: misfit})), message)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Labels, counts, sizes and batch sizes out of range


@pytest.mark.parametrize("label, message", [
    (2, "label must lie in [0, 2), got 2"),
    (-1, "label must lie in [0, 2), got -1"),
    (None, "the priors are class-conditional: give a label in [0, 2)"),
    ("0,2", "label must lie in [0, 2), got 2"),
    ("1,x", "--label must be a class, a comma list of classes or all, got '1,x'"),
])
def test_sample_refuses_a_label_outside_the_classes(models, script, tmp_path, label, message):
    out = tmp_path / "samples.png"
    label_args = [] if label is None else ["--label", label]
    assert_refused(script("sample.py", *sample_args(models, out), *label_args), message)
    assert not out.exists()


def test_sample_refuses_a_label_for_unconditional_priors_and_samples_without(models, script, tmp_path):
    out = tmp_path / "samples.png"
    args = sample_args(models, out, top=models["top_unconditional"], bottom=models["bottom_unconditional"])
    assert_refused(script("sample.py", *args, "--label", 0), "not class-conditional")
    assert not out.exists()
    status, stderr = script("sample.py", *args)
    assert status == 0, stderr
    assert Image.open(out).size == (2 * IMAGE_SIZE + 3 * 2, IMAGE_SIZE + 2 * 2)


@pytest.mark.parametrize("option, value, message", [
    ("--n", 0, "--n must be >= 1, got 0"),
    ("--n", -2, "--n must be >= 1, got -2"),
    ("--temperature", 0, "--temperature must be > 0"),
    ("--temperature", "nan", "--temperature must be > 0 and finite, got nan"),  # crashed later before
    ("--temperature", "inf", "--temperature must be > 0 and finite, got inf"),  # was accepted before
    ("--batch-size", 0, "--batch-size must be >= 1, got 0"),
])
def test_sample_refuses_bad_counts(models, script, tmp_path, option, value, message):
    out = tmp_path / "samples.png"
    assert_refused(script("sample.py", *sample_args(models, out), "--label", 0, option, value), message)
    assert not out.exists()


@pytest.mark.parametrize("option, name, suffix", [("--out", "x.jpg", ".png"), ("--save-codes", "x.pt", ".safetensors")])
def test_sample_refuses_a_file_name_its_format_does_not_match(models, script, tmp_path, option, name, suffix):
    """`--out x.jpg` once wrote PNG data into x.jpg, and `--save-codes x.pt` safetensors into x.pt."""
    args = sample_args(models, tmp_path / "samples.png")
    if option == "--out":
        args[-1] = tmp_path / name
    else:
        args += [option, tmp_path / name]
    assert_refused(script("sample.py", *args, "--label", 0), option, name, f"must end in {suffix}")
    assert list(tmp_path.iterdir()) == []


def test_inference_scripts_expand_the_home_directory(models, script, tmp_path, monkeypatch):
    """`~` in a path option means the home directory, in every script (the trainers test theirs)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    status, stderr = script("evaluate.py", "--ckpt", "~/no-model", "--data", models["images"])
    assert status == 2 and str(tmp_path / "no-model") in stderr, stderr
    args = sample_args(models, "~/samples.png")
    status, stderr = script("sample.py", *args, "--label", 0)
    assert status == 0, stderr
    assert (tmp_path / "samples.png").is_file()


@pytest.mark.parametrize("batch_size", [0, -4])
def test_evaluate_refuses_bad_batch_sizes(models, script, batch_size):
    result = script("evaluate.py", "--ckpt", models["pixel"], "--data", models["images"], "--batch-size", batch_size)
    assert_refused(result, f"--batch-size must be >= 1, got {batch_size}")


def test_evaluate_refuses_missing_data(models, script, tmp_path):
    assert_refused(script("evaluate.py", "--ckpt", models["pixel"], "--data", tmp_path / "nowhere"),
                   "dataset not found", tmp_path / "nowhere")


@pytest.mark.parametrize("options, message", [
    (["--size", 12], "image_size must be a multiple of 8 and >= 8 (two levels of stride 4 and 8), got 12"),
    (["--size", 0], "got 0"),
    (["--size", -8], "got -8"),
    (["--batch-size", 0], "--batch-size must be >= 1, got 0"),
    (["--batch-size", -1], "--batch-size must be >= 1, got -1"),
    (["--workers", -1], "--workers must be >= 0, got -1"),
    (["--n-classes", -1], "--n-classes must be >= 0, got -1"),
    (["--n-classes", 1, "--data", "LABELLED"], "has labels up to 1: --n-classes 1 is too few"),
])
def test_extract_codes_refuses_bad_sizes_before_writing(models, script, tmp_path, options, message):
    data = models["images"]
    if "LABELLED" in options:
        data = tmp_path / "labelled"
        for k, name in enumerate(["a", "b", "a", "b"] * 3):
            save_image_file(data / name / f"{k}.png", np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
        options = options[:-2]
    out = tmp_path / "codes.lmdb"
    result = script("extract_codes.py", "--vqvae", models["vqvae"], "--data", data, "--out", out, *options)
    assert_refused(result, message)
    assert not out.exists()


@pytest.mark.parametrize("options, message", [
    (["--size", 12], "size must be a positive multiple of 8, got 12"),
    (["--size", 0], "size must be a positive multiple of 8, got 0"),
    (["--size", -8], "size must be a positive multiple of 8, got -8"),
    (["--batch-size", 0], "--batch-size must be >= 1, got 0"),
    (["--batch-size", -3], "--batch-size must be >= 1, got -3"),
])
def test_train_vqvae_refuses_bad_sizes_before_writing(models, script, tmp_path, options, message):
    out = tmp_path / "vqvae"
    assert_refused(script("train_vqvae.py", "--data", models["images"], "--out", out, *options), message)
    assert not out.exists()


@pytest.mark.parametrize("batch_size", [0, -1])
def test_train_pixelsnail_refuses_bad_batch_sizes_before_writing(models, script, tmp_path, batch_size):
    out = tmp_path / "run"
    result = script("train_pixelsnail.py", "--data", models["images"], "--out", out, "--preset", "tiny",
                    "--batch-size", batch_size)
    assert_refused(result, f"--batch-size must be >= 1, got {batch_size}")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Damaged images met while training or extracting


def test_a_damaged_image_stops_training_before_the_run_directory_is_made(tmp_path):
    folder = tmp_path / "images"
    rng = np.random.default_rng(2)
    for k in range(12):
        save_image_file(folder / f"{k:02d}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    truncated = folder / "01.png"  # the first training image: read for the data-dependent init
    truncated.write_bytes(truncated.read_bytes()[:60])
    out = tmp_path / "run"
    config = TrainConfig(data=str(folder), out=str(out), preset="tiny", steps=2, precision="fp32", n_samples=0)
    with pytest.raises(DataError, match=f"cannot read image {truncated}"):
        train(config)
    assert not out.exists()


def test_a_new_run_does_not_keep_the_log_of_a_run_that_failed_before_its_first_checkpoint(tmp_path):
    folder = tmp_path / "images"
    for k in range(12):
        save_image_file(folder / f"{k:02d}.png", np.full((8, 8, 3), 20 * k, np.uint8))
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"step": 500, "test_bits": 9.0}) + "\n")
    train(TrainConfig(data=str(folder), out=str(out), preset="tiny", steps=2, eval_every=1, eval_batches=1,
                      precision="fp32", n_samples=0))
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


class FailsInWorker(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise DataError("cannot read image /data/x.png: image file is truncated")


def test_an_error_from_a_dataloader_worker_becomes_one_line():
    with pytest.raises(DataError) as excinfo:
        next(iter(DataLoader(FailsInWorker(), num_workers=1)))
    assert "Traceback" in str(excinfo.value)  # what torch makes of it
    assert one_line(excinfo.value) == "cannot read image /data/x.png: image file is truncated"
    assert one_line(ValueError("two\nlines")) == "two lines"
    refusal = RuntimeError("Weights only load failed. ...\nWeightsUnpickler error: Unsupported global: GLOBAL "
                           "os.system. Please use `torch.serialization.add_safe_globals` to allowlist it.\n")
    assert one_line(refusal) == "Unsupported global: GLOBAL os.system"
    assert one_line(ValueError("x" * 50), limit=10) == "xxxxxxx..." and one_line(KeyError()) == "KeyError"


def test_extraction_stopped_by_a_damaged_image_in_a_worker_leaves_an_incomplete_database(models, tmp_path):
    """A real process: the error comes from a DataLoader worker; the database it leaves is refused
    by readers as incomplete, never taken for a complete one."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(3)
    for k in range(12):
        save_image_file(folder / f"{k:02d}.png", rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    truncated = folder / "07.png"
    truncated.write_bytes(truncated.read_bytes()[:80])
    out = tmp_path / "codes.lmdb"
    result = subprocess.run(
        [sys.executable, "scripts/extract_codes.py", "--vqvae", str(models["vqvae"]), "--data", str(folder),
         "--out", str(out), "--batch-size", "2", "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert_refused((result.returncode, result.stderr), f"cannot read image {truncated}")
    with pytest.raises(CodeStoreError, match="incomplete"):
        read_metadata(out)


@pytest.mark.parametrize("name", ["train_pixelsnail.py", "extract_codes.py", "sample.py"])
def test_ctrl_c_while_a_script_imports_prints_one_line(name):
    """A Ctrl-C during the seconds torch takes to import printed a KeyboardInterrupt traceback."""
    child = subprocess.Popen([sys.executable, str(ROOT / "scripts" / name), "--help"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.25)  # past Python's start, inside the imports
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert stderr.strip() == "interrupted while starting"


def test_ctrl_c_during_extraction_says_how_to_go_on(monkeypatch, capsys):
    """extract_codes.py said only "interrupted"; its records are kept and the same command resumes."""
    from pipelines import cli

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        cli.run(interrupted, interrupted=runpy.run_path(str(ROOT / "scripts" / "extract_codes.py"))["INTERRUPTED"])
    assert exit_info.value.code == 130
    assert "run the same command again to resume" in capsys.readouterr().err
