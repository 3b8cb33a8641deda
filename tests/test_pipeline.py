"""The VQ-VAE-2 pipeline end to end through its scripts, on tiny generated data:
train a VQ-VAE, extract codes, train top and bottom priors (one of them on two processes),
sample and decode; and the refusals of checkpoints that do not belong together."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from launch import ok, run_in_process, run_script
from pipelines.infer.generation import generate, load_pipeline
from pipelines.store.checkpoint import save_checkpoint
from prior import PixelSNAIL, PixelSNAILConfig

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--precision", "fp32", "--batch-size", "4", "--eval-every", "2"]


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """Two classes of 16x16 images in class folders -> VQ-VAE, codes, top and bottom priors."""
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 16)
    for label, name in enumerate(("reds", "blues")):
        (root / "images" / name).mkdir(parents=True)
        for k in range(15):
            colour = np.array([200, 40, 40]) if label == 0 else np.array([40, 40, 200])
            image = colour * (0.5 + 0.5 * ramp[None, :, None]) + rng.normal(0, 10, (16, 16, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / name / f"{k}.png")
    images = str(root / "images")
    ok("scripts/train_vqvae.py", "--data", images, "--preset", "cpu-small", "--size", "16", "--steps", "4",
       "--out", str(root / "vqvae"), *FAST, in_process=True)
    out = ok("scripts/extract_codes.py", "--vqvae", str(root / "vqvae"), "--data", images, "--out",
             str(root / "codes.lmdb"), in_process=True)
    assert out.strip().splitlines()[-1] == f"{root / 'codes.lmdb'}: 27 records, complete"
    top = ok("scripts/train_prior.py", "--codes", str(root / "codes.lmdb"), "--level", "top", "--preset", "cpu-top",
             "--steps", "4", "--out", str(root / "top"), "--label-dropout", "0.2", *FAST, in_process=True)
    bottom = ok("scripts/train_prior.py", "--codes", str(root / "codes.lmdb"), "--level", "bottom",
                "--preset", "cpu-bottom", "--steps", "4", "--out", str(root / "bottom"), "--label-dropout", "0.2",
                *FAST, processes=2)
    return root, top, bottom


def test_priors_train_and_report_bits_per_code(pipeline_runs):
    _, top, bottom = pipeline_runs
    for out in (top, bottom):
        assert out.strip().splitlines()[-1].startswith("test bits/code: ")
    assert "2 process(es) on cpu" in bottom and "parameters identical on all 2 processes" in bottom


def test_sample_script_writes_images_and_codes(pipeline_runs):
    root, _, _ = pipeline_runs
    args = ["scripts/sample.py", "--vqvae", str(root / "vqvae"), "--top", str(root / "top"),
            "--bottom", str(root / "bottom"), "--n", "4", "--label", "1", "--out", str(root / "samples.png"),
            "--save-codes", str(root / "codes.safetensors")]
    assert ok(*args, in_process=True).strip().endswith(f"to {root / 'samples.png'}")
    assert Image.open(root / "samples.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    codes = load_file(root / "codes.safetensors")
    assert codes["top_codes"].shape == (4, 2, 2) and codes["bottom_codes"].shape == (4, 4, 4)

    result = run_script(*args[:-4], "--label", "2", "--out", str(root / "x.png"))  # the real command line
    assert result.returncode == 2 and "label must lie in [0, 2)" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    swapped = run_in_process("scripts/sample.py", "--vqvae", str(root / "vqvae"), "--top", str(root / "bottom"),
                             "--bottom", str(root / "top"), "--out", str(root / "x.png"))
    assert swapped.returncode == 2 and "is not a top prior" in swapped.stderr


def test_report_of_the_pipeline(pipeline_runs, tmp_path):
    """scripts/report.py on the pipeline directory: its runs in pipeline order, the code frequencies."""
    root, _, _ = pipeline_runs
    out, curves = tmp_path / "report.html", tmp_path / "curves.png"
    printed = ok("scripts/report.py", str(root), "--out", str(out), "--curves", str(curves), in_process=True).split()
    assert printed == ["report:", str(out), "curves:", str(curves)]
    text = out.read_text()
    sections = [text.index(f"<h2>Run {root / name}</h2>") for name in ("vqvae", "top", "bottom")]
    assert text.index(f"<h2>Pipeline {root}</h2>") < sections[0] < sections[1] < sections[2]
    assert f"alt='learning curves of the runs of {root}'" in text and text.count("alt='learning curves of ") == 4
    assert text.count("<h3>Codebook usage</h3>") == 1
    assert Image.open(curves).size == (1100, 360)
    assert f"codes of the 27 images in {root / 'codes.lmdb'}" in text


def test_sample_script_guides_and_truncates_and_refuses_guidance_without_a_null_class(pipeline_runs, tmp_path):
    """The priors trained with --label-dropout 0.2 have a null class; a copy of the bottom prior
    without one makes --guidance fail in one line, before anything is written."""
    from pipelines.store.checkpoint import load_checkpoint

    root, _, _ = pipeline_runs
    pipeline = load_pipeline(root / "vqvae", root / "top", root / "bottom")
    assert pipeline.top.config.null_label == 2 and pipeline.bottom.config.label_dropout == 0.2
    args = ["scripts/sample.py", "--vqvae", str(root / "vqvae"), "--top", str(root / "top"), "--n", "3", "--label",
            "0", "--device", "cpu", "--guidance", "3", "--top-k", "5", "--top-p", "0.9"]
    ok(*args, "--bottom", str(root / "bottom"), "--out", str(tmp_path / "guided.png"), in_process=True)
    assert Image.open(tmp_path / "guided.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)

    state = load_file(root / "bottom" / "model.safetensors")
    _, config_json, extra = load_checkpoint(root / "bottom", "pixelsnail")
    plain = PixelSNAILConfig.from_json(config_json)
    plain.label_dropout = 0.0
    state["class_embed.weight"] = state["class_embed.weight"][:2].clone()
    save_checkpoint(tmp_path / "plain.safetensors", state, "pixelsnail", plain, **extra)
    result = run_in_process(*args, "--bottom", str(tmp_path / "plain.safetensors"), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "the bottom prior: guidance needs a prior trained with label dropout" in result.stderr
    assert not (tmp_path / "x.png").exists()
    result = run_in_process(*args, "--bottom", str(root / "bottom"), "--top-p", "0", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "top-p must lie in (0, 1]" in result.stderr


def test_pipeline_completion_keeps_the_codes_of_the_kept_rows(pipeline_runs, tmp_path):
    """16x16 images, 2x2 top and 4x4 bottom codes: keeping 5 image rows keeps the code rows that
    cover them, 1 top row and 2 bottom rows, and samples the rest."""
    from pipelines.data.datasets import read_image, to_model_range
    from pipelines.infer.completion import complete_codes

    root, _, _ = pipeline_runs
    pipeline = load_pipeline(root / "vqvae", root / "top", root / "bottom")
    image = to_model_range(read_image(root / "images" / "reds" / "0.png", 16))
    top, bottom = pipeline.vqvae.encode(image[None])
    _, top_codes, bottom_codes = complete_codes(pipeline, image, 5, 20, label=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_codes[:, :1], top[:, :1].expand(20, -1, -1))
    assert torch.equal(bottom_codes[:, :2], bottom[:, :2].expand(20, -1, -1))
    assert not torch.equal(bottom_codes[:, 2:], bottom[:, 2:].expand(20, -1, -1))

    out = ok("scripts/complete.py", "--vqvae", str(root / "vqvae"), "--top", str(root / "top"), "--bottom",
             str(root / "bottom"), str(root / "images" / "blues"), "--keep", "0.5", "--n", "2", "--label", "1",
             "--guidance", "2", "--out-dir", str(tmp_path), "--device", "cpu", in_process=True)
    assert "wrote 15 grids of 2 completions (kept 8 of 16 rows)" in out
    assert Image.open(tmp_path / "0000_0.png").size == (4 * 16 + 5 * 2, 16 + 2 * 2)


def test_generation_is_seeded(pipeline_runs):
    root, _, _ = pipeline_runs
    pipeline = load_pipeline(root / "vqvae", root / "top", root / "bottom")
    first = generate(pipeline, 2, 0, generator=torch.Generator().manual_seed(5))
    again = generate(pipeline, 2, 0, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (2, 3, 16, 16) and first[0].abs().max() <= 1


def test_priors_that_do_not_fit_are_refused(pipeline_runs, tmp_path):
    root, _, _ = pipeline_runs
    state = load_file(root / "top" / "model.safetensors")
    from pipelines.store.checkpoint import load_checkpoint

    _, config_json, extra = load_checkpoint(root / "top", "pixelsnail")
    config = PixelSNAILConfig.from_json(config_json)

    foreign = dict(extra, codes=dict(extra["codes"], vqvae_sha256="0" * 64))
    save_checkpoint(tmp_path / "foreign.safetensors", state, "pixelsnail", config, **foreign)
    with pytest.raises(ValueError, match="codes of another VQ-VAE"):
        load_pipeline(root / "vqvae", tmp_path / "foreign.safetensors", root / "bottom")

    wider = PixelSNAILConfig.from_json(config_json)
    wider.n_codes = config.n_codes * 2
    save_checkpoint(tmp_path / "wider.safetensors", PixelSNAIL(wider).state_dict(), "pixelsnail", wider, **extra)
    with pytest.raises(ValueError, match=f"n_codes={2 * config.n_codes} but .* has {config.n_codes}"):
        load_pipeline(root / "vqvae", tmp_path / "wider.safetensors", root / "bottom")


def test_a_prior_refuses_a_database_it_does_not_fit(pipeline_runs, tmp_path):
    root, _, _ = pipeline_runs
    from pipelines.store.codes import read_metadata
    from pipelines.store.provenance import PriorProvenance, check_fits

    metadata = read_metadata(root / "codes.lmdb")
    config = PixelSNAILConfig(shape=(3, 3), n_codes=metadata["top_codes"], n_classes=2)
    with pytest.raises(ValueError, match=r"shape=\(3, 3\) but the code database has \(2, 2\)"):
        check_fits(config, PriorProvenance.of_database(metadata, "top"), "the code database")


def test_high_resolution_path_256():
    """256x256 images: 32x32 top and 64x64 bottom grids, sampled (cached) and decoded."""
    from pipelines.infer.generation import Pipeline
    from vqvae import VQVAE2, VQVAE2Config

    torch.manual_seed(0)
    vqvae = VQVAE2(VQVAE2Config(channels=16, res_channels=8, n_res_blocks=1, top_codes=16, bottom_codes=16, code_dim=8))
    small = dict(channels=8, n_blocks=1, n_res_blocks=1, kernel_size=3, key_channels=4, value_channels=4,
                 embed_channels=4, cond_channels=4, cond_res_blocks=1, dropout=0.0, n_classes=3)
    top = PixelSNAIL(PixelSNAILConfig(shape=(32, 32), n_codes=16, **small))
    bottom = PixelSNAIL(PixelSNAILConfig(shape=(64, 64), n_codes=16, cond_codes=16, cond_shape=(32, 32),
                                         attention=False, **small))
    images, top_codes, bottom_codes = generate(Pipeline(vqvae.eval(), top, bottom, 256), 1, 2,
                                               generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 256, 256) and top_codes.shape == (1, 32, 32) and bottom_codes.shape == (1, 64, 64)


# ------------------------------------------------------------------------------------------------
# Sampling at scale: --out-dir, --batch-size, several processes, resume


def sample_args(root, out_dir, *extra):
    return ["scripts/sample.py", "--vqvae", str(root / "vqvae"), "--top", str(root / "top"), "--bottom",
            str(root / "bottom"), "--precision", "fp32", "--device", "cpu", "--seed", "3", "--out-dir", str(out_dir),
            *extra]


def differing(a, b):
    """The number of samples whose codes differ between two samples.npz."""
    return int(sum(((a[name] != b[name]).reshape(len(a[name]), -1).any(1)).sum()
                   for name in ("top_codes", "bottom_codes")))


def test_the_same_seed_gives_the_same_samples_whatever_the_batch_size_and_processes(pipeline_runs, tmp_path):
    """Sample i draws from a generator seeded by (seed, i): 1 process in batches of 5 and 2 processes
    in batches of 2 make the same 6 samples (3 of each class), in fp32 to the last code and pixel."""
    from pipelines.store.samples import load

    root, _, _ = pipeline_runs
    ok(*sample_args(root, tmp_path / "one", "--label", "all", "--n", "3", "--batch-size", "5"), in_process=True)
    out = ok(*sample_args(root, tmp_path / "two", "--label", "all", "--n", "3", "--batch-size", "2",
                          "--out", str(tmp_path / "grid.png")), processes=2)
    assert out.count("wrote 6 samples") == 1
    one, two = load(tmp_path / "one" / "samples.npz"), load(tmp_path / "two" / "samples.npz")
    assert one["images"].shape == (6, 16, 16, 3) and one["images"].dtype == np.uint8
    assert one["top_codes"].shape == (6, 2, 2) and one["bottom_codes"].shape == (6, 4, 4)
    assert one["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert differing(one, two) == 0  # rounding could make rare differences: there are none here
    assert all(np.array_equal(one[name], two[name]) for name in one)
    names = sorted(path.name for path in (tmp_path / "two").glob("*.png"))
    assert names == [f"{i:06d}_label{i // 3}.png" for i in range(6)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / names[4])), one["images"][4])
    assert Image.open(tmp_path / "grid.png").size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)  # a row per class
    assert len(set(map(bytes, one["bottom_codes"]))) > 1  # the samples differ from each other


def test_a_killed_sampling_job_resumes_to_the_samples_of_an_uninterrupted_one(pipeline_runs, tmp_path):
    from pipelines.store.samples import load

    root, _, _ = pipeline_runs
    out_dir = tmp_path / "killed"
    args = sample_args(root, out_dir, "--label", "0,1", "--n", "60", "--batch-size", "2")
    child = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list((out_dir / "parts").glob("*.npz"))) < 3 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    written = len(list((out_dir / "parts").glob("*.npz")))
    assert 3 <= written < 60 and not (out_dir / "samples.npz").exists()

    out = ok(*args, in_process=True)
    assert f"{2 * written} of 120 samples written already" in out
    ok(*sample_args(root, tmp_path / "whole", "--label", "0,1", "--n", "60", "--batch-size", "7"), in_process=True)
    resumed, whole = load(out_dir / "samples.npz"), load(tmp_path / "whole" / "samples.npz")
    assert differing(resumed, whole) == 0
    assert all(np.array_equal(resumed[name], whole[name]) for name in whole)
    assert len(list(out_dir.glob("*.png"))) == 120 and not list(out_dir.rglob("*.tmp"))


def test_another_job_in_the_same_directory_is_refused(pipeline_runs, tmp_path):
    root, _, _ = pipeline_runs
    ok(*sample_args(root, tmp_path / "samples", "--label", "1", "--n", "2"), in_process=True)
    result = run_in_process(*sample_args(root, tmp_path / "samples", "--label", "1", "--n", "2",
                                         "--temperature", "0.5"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "holds samples of another job: temperature 1.0 there, 0.5 now" in result.stderr
    again = ok(*sample_args(root, tmp_path / "samples", "--label", "1", "--n", "2"), in_process=True)
    assert "2 of 2 samples written already" in again


def test_per_sample_keys_draw_the_same_in_any_batch(pipeline_runs):
    """generate() with per-sample keys: sample k of a batch of 5 equals the same sample alone."""
    from pipelines.infer.generation import sample_keys

    root, _, _ = pipeline_runs
    pipeline = load_pipeline(root / "vqvae", root / "top", root / "bottom")
    batch = generate(pipeline, 5, [0, 1, 1, 0, 1], generator=sample_keys(7, range(5), "cpu"))
    for k in (0, 3, 4):
        alone = generate(pipeline, 1, [[0, 1, 1, 0, 1][k]], generator=sample_keys(7, [k], "cpu"))
        assert all(torch.equal(a, b[k : k + 1]) for a, b in zip(alone[1:], batch[1:]))
        assert torch.allclose(alone[0], batch[0][k : k + 1], atol=1e-6)
