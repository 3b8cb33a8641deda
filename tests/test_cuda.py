"""The same guarantees on CUDA: causality, cached == naive sampling in fp32, and one short run of
every trainer. Skipped without a GPU (CI has none); `make gpu-check` runs them where there is one."""

import numpy as np
import pytest
import torch
from PIL import Image

from launch import ok as run
from prior import PixelSNAIL, PixelSNAILConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
SMALL = dict(channels=16, n_blocks=2, n_res_blocks=1, key_channels=4, value_channels=8, dropout=0.0)
CODES = dict(n_codes=7, embed_channels=8, cond_channels=8, cond_res_blocks=1)
CONDITIONED = dict(n_classes=3, cond_codes=5, cond_shape=(2, 3))

CONFIGS = {
    "pixels_attention": PixelSNAILConfig(shape=(5, 6), n_mixtures=2, **SMALL),
    "pixels_no_attention": PixelSNAILConfig(shape=(5, 6), n_mixtures=2, attention=False, **SMALL),
    "codes_cond_attention": PixelSNAILConfig(shape=(4, 5), **CODES, **CONDITIONED, **SMALL),
    "codes_cond_no_attention_kernel5": PixelSNAILConfig(
        shape=(4, 5), **CODES, **CONDITIONED, **{**SMALL, "attention": False, "kernel_size": 5}),
}


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 would round fp32 matmuls and convolutions to 10 mantissa bits: off, as on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def inputs(config, n, generator):
    """(x, label, cond) on the GPU for a model of `config`."""
    if config.pixel_mode:
        x = torch.randint(0, 256, (n, 3, *config.shape), generator=generator) / 127.5 - 1
    else:
        x = torch.randint(0, config.n_codes, (n, *config.shape), generator=generator)
    label = torch.randint(0, config.n_classes, (n,), generator=generator) if config.n_classes else None
    cond = (torch.randint(0, config.cond_codes, (n, *config.cond_shape), generator=generator)
            if config.cond_codes else None)
    return [None if t is None else t.to(CUDA) for t in (x, label, cond)]


def trained_looking(config):
    """A model on the GPU whose every weight matters: data-dependent init, then noise."""
    torch.manual_seed(0)
    model = PixelSNAIL(config).to(CUDA)
    model.init_from_data(*inputs(config, 4, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def dependence(model, x, label, cond, i, j):
    """|d output(i, j) / d input| per input position, (H, W): with respect to the pixels, or to
    the embedding each code looks up (codes are discrete)."""
    if model.config.pixel_mode:
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x, label, cond)[0, :, i, j].sum(), x)
        return grad[0].abs().sum(0)
    embedded = []
    hook = model.embed.register_forward_hook(lambda m, inp, out: embedded.append(out.retain_grad() or out))
    out = model(x, label, cond)
    hook.remove()
    out[0, :, i, j].sum().backward()
    return embedded[0].grad[0].abs().sum(-1)


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_and_no_blind_spot_on_cuda(name):
    config = CONFIGS[name]
    model = trained_looking(config)
    x, label, cond = inputs(config, 2, torch.Generator().manual_seed(2))
    height, width = config.shape
    for i, j in [(0, 0), (1, width - 1), (height - 1, 0), (height - 1, width - 1)]:
        flat = dependence(model, x, label, cond, i, j).flatten().cpu()
        here = i * width + j
        assert torch.all(flat[here:] == 0), f"{name}: output at {(i, j)} depends on itself or a later position"
        assert torch.all(flat[:here] > 0), f"{name}: output at {(i, j)} is blind to an earlier position"


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_sampler_equals_naive_on_cuda(name):
    config = CONFIGS[name]
    model = trained_looking(config)
    _, label, cond = inputs(config, 3, torch.Generator().manual_seed(3))
    draws = [model.sample(3, label, cond, generator=torch.Generator(CUDA).manual_seed(4), cache=cache)
             for cache in (False, True)]
    assert torch.equal(*draws)


@pytest.mark.parametrize("name", CONFIGS)
def test_captured_steps_draw_what_eager_steps_draw_on_cuda(name):
    """One CUDA graph per level (row start, step), replayed at every position, with per-sample keys:
    the same samples as the eager steps, a prefix kept mid-row included."""
    from prior.noise import SampleKeys
    from prior.sampling import sample_cached

    config = CONFIGS[name]
    model = trained_looking(config)
    prefix, label, cond = inputs(config, 3, torch.Generator().manual_seed(3))
    for options in ({}, {"prefix": prefix, "kept": config.shape[1] + 2}):
        eager, captured = (sample_cached(model, 3, label, cond, SampleKeys.of(4, range(3), CUDA), capture=capture,
                                         **options) for capture in (False, True))
        assert torch.equal(eager, captured)


# -- the scripts on CUDA ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two classes of 16x16 images in class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, colour in enumerate(([200, 40, 40], [40, 40, 200])):
        (root / str(label)).mkdir()
        for k in range(12):
            image = np.array(colour) * rng.uniform(0.5, 1.0) + rng.normal(0, 10, (16, 16, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / str(label) / f"{k}.png")
    return root


SHORT = ["--batch-size", "4", "--steps", "3", "--eval-every", "3", "--precision", "bf16"]


def test_pixel_trainer_runs_on_cuda(images, tmp_path):
    out = run("scripts/train_pixelsnail.py", "--data", str(images), "--preset", "tiny", "--n-samples", "2",
              "--out", str(tmp_path / "pixels"), *SHORT)
    assert "on cuda" in out and out.strip().splitlines()[-1].startswith("test bits/dim: ")


@pytest.fixture(scope="module")
def pipeline(images, tmp_path_factory):
    """VQ-VAE, codes, top and bottom priors, each trained and extracted on CUDA."""
    root = tmp_path_factory.mktemp("pipeline")
    logs = {"vqvae": run("scripts/train_vqvae.py", "--data", str(images), "--preset", "cpu-small", "--size", "16",
                         "--out", str(root / "vqvae"), *SHORT)}
    logs["extract"] = run("scripts/extract_codes.py", "--vqvae", str(root / "vqvae"), "--data", str(images),
                          "--out", str(root / "codes.lmdb"), "--device", "cuda")
    for level in ("top", "bottom"):
        logs[level] = run("scripts/train_prior.py", "--codes", str(root / "codes.lmdb"), "--level", level,
                          "--preset", f"cpu-{level}", "--out", str(root / level), *SHORT)
    return root, logs


def test_vqvae_and_prior_trainers_run_on_cuda(pipeline):
    _, logs = pipeline
    for name in ("vqvae", "top", "bottom"):
        assert "on cuda" in logs[name], name
    assert logs["top"].strip().splitlines()[-1].startswith("test bits/code: ")


def test_extraction_and_sampling_run_on_cuda(pipeline):
    root, logs = pipeline
    assert logs["extract"].strip().splitlines()[-1].startswith("wrote ")
    run("scripts/sample.py", "--vqvae", str(root / "vqvae"), "--top", str(root / "top"), "--bottom",
        str(root / "bottom"), "--n", "4", "--label", "1", "--out", str(root / "samples.png"), "--device", "cuda")
    assert Image.open(root / "samples.png").size[0] > 0
