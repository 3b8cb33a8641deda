"""The VQ-VAE-2 model: shapes, config, training, encode/decode, checkpoints."""

import math

import pytest
import torch

from pipelines.store.checkpoint import VQVAE_KIND, CheckpointError, load_pixelsnail, load_vqvae, save_checkpoint
from vqvae import VQVAE2, VQVAE2Config

SMALL = dict(top_codes=16, bottom_codes=32, code_dim=8, channels=32, res_channels=16, n_res_blocks=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_images(n, size):
    """(n, 3, size, size) in [-1, 1]: a flat colour plus a tilted sine wave, per image."""
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, size)
    colours = torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1
    angles = torch.rand(n, 1, 1, 1, generator=generator) * 2 * math.pi
    rows, cols = torch.meshgrid(ramp, ramp, indexing="ij")
    waves = torch.sin(3 * (cols * angles.cos() + rows * angles.sin()))
    return (0.6 * colours + 0.4 * waves).clamp(-1, 1)


def small_model():
    torch.manual_seed(0)
    return VQVAE2(VQVAE2Config(**SMALL))


def codebooks(model):
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


@pytest.fixture(scope="module")
def training_run(fit_vqvae):
    """A small model after 60 Adam steps on 8 smooth 32x32 images -> (model, images, losses)."""
    model = small_model()
    images = smooth_images(8, 32)
    losses = fit_vqvae(model, images, lr=3e-3)
    return model.eval(), images, losses


def test_code_shapes():
    model = small_model()
    assert model.code_shapes(256) == ((32, 32), (64, 64))
    assert model.code_shapes(32) == ((4, 4), (8, 8))
    assert model.code_shapes(8) == ((1, 1), (2, 2))
    for bad in (0, 4, 12, 36):
        with pytest.raises(ValueError, match="multiple of 8 and >= 8"):
            model.code_shapes(bad)


@pytest.mark.parametrize("size, batch", [(32, 2), (64, 2), (256, 1)])
def test_shapes_of_the_paper_model(size, batch):
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config())
    images = torch.rand(batch, 3, size, size) * 2 - 1
    (top_h, top_w), (bottom_h, bottom_w) = model.code_shapes(size)
    out = model(images)
    assert out.reconstruction.shape == images.shape
    for name in ("loss", "reconstruction_loss", "commitment_loss"):
        assert getattr(out, name).shape == () and getattr(out, name).dtype == torch.float32
    assert torch.allclose(out.loss, out.reconstruction_loss + out.commitment_loss)
    for stats, n_codes in ((out.top, 512), (out.bottom, 512)):
        assert 1.0 <= stats.perplexity.item() <= n_codes and 0.0 < stats.usage.item() <= 1.0
    top_codes, bottom_codes = model.eval().encode(images)
    assert top_codes.shape == (batch, top_h, top_w) and bottom_codes.shape == (batch, bottom_h, bottom_w)
    assert top_codes.dtype == bottom_codes.dtype == torch.long
    decoded = model.decode_codes(top_codes, bottom_codes)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1.0


def test_default_config_is_the_paper_and_round_trips_through_json():
    config = VQVAE2Config()
    assert (config.top_codes, config.bottom_codes, config.code_dim) == (512, 512, 64)
    assert (config.decay, config.eps, config.commitment) == (0.99, 1e-5, 0.25)
    assert (config.channels, config.res_channels, config.n_res_blocks) == (128, 64, 2)
    assert VQVAE2Config.from_json(config.to_json()) == config
    small = VQVAE2Config(**SMALL, dead_code_threshold=0.5)
    assert VQVAE2Config.from_json(small.to_json()) == small
    with pytest.raises(ValueError, match=r"unknown VQVAE2Config fields \['n_levels'\]"):
        VQVAE2Config.from_json(config.to_json()[:-1] + ', "n_levels": 3}')


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("top_codes", 1, "top_codes must be >= 2"),
        ("bottom_codes", 0, "bottom_codes must be >= 2"),
        ("code_dim", 0, "code_dim must be >= 1"),
        ("channels", 33, "channels must be even"),
        ("n_res_blocks", 0, "n_res_blocks must be >= 1"),
        ("decay", 0.0, r"decay must be in \(0, 1\)"),
        ("eps", -1e-5, "eps must be > 0"),
        ("commitment", -0.25, "commitment must be >= 0"),
        ("dead_code_threshold", -1.0, "dead_code_threshold must be >= 0"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        VQVAE2Config(**{field: value})


def test_bad_inputs_raise():
    model = small_model().eval()
    with pytest.raises(ValueError, match="multiple of 8"):
        model(torch.zeros(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"float \(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 32, 32))
    top_codes, bottom_codes = torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"bottom codes must have shape \(1, 8, 8\)"):
        model.decode_codes(top_codes, bottom_codes[:, :4])
    with pytest.raises(ValueError, match=r"top codes must lie in \[0, 16\)"):
        model.decode_codes(top_codes + 16, bottom_codes)
    with pytest.raises(ValueError, match="bottom codes must be integer"):
        model.decode_codes(top_codes, bottom_codes.float())


def test_training_lowers_the_reconstruction_error(training_run):
    _, _, losses = training_run
    assert losses[-1] < 0.5 * losses[0], losses


def test_decoding_the_codes_gives_the_reconstruction(training_run):
    model, images, _ = training_run
    out = model(images)
    decoded = model.decode_codes(*model.encode(images))
    assert torch.allclose(decoded, out.reconstruction.clamp(-1, 1), atol=1e-5)


def test_encode_and_decode_never_change_the_codebooks():
    model = small_model()
    images = smooth_images(2, 32)
    model.train()(images)  # a training forward: the EMA state is no longer the initial one
    before = codebooks(model)
    top_codes, bottom_codes = model.encode(images)  # still in training mode
    model.decode_codes(top_codes, bottom_codes)
    model.eval()(images)
    after = codebooks(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    model.train()(images)
    assert not all(torch.equal(before[name], codebooks(model)[name]) for name in before)


def test_quantizers_stay_fp32_under_bf16_autocast():
    model = small_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(smooth_images(2, 32))
    assert out.reconstruction_loss.dtype == out.commitment_loss.dtype == torch.float32
    assert all(buffer.dtype == torch.float32 for buffer in model.buffers())
    out.loss.backward()


def test_checkpoint_round_trip(training_run, tmp_path):
    model, images, _ = training_run
    path = tmp_path / "vqvae.safetensors"
    save_checkpoint(path, model.state_dict(), VQVAE_KIND, model.config, step=60)
    loaded, extra = load_vqvae(path)
    assert extra == {"step": 60} and loaded.config == model.config and not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    for codes, loaded_codes in zip(model.encode(images), loaded.encode(images)):
        assert torch.equal(codes, loaded_codes)
    with pytest.raises(CheckpointError, match="holds a 'vqvae2' model, expected 'pixelsnail'"):
        load_pixelsnail(path)


def test_load_vqvae_refuses_weights_that_do_not_fit_the_config(tmp_path):
    model = small_model()
    other_config = VQVAE2Config(**{**SMALL, "top_codes": 8})
    save_checkpoint(tmp_path / "bad.safetensors", model.state_dict(), VQVAE_KIND, other_config)
    with pytest.raises(CheckpointError, match="weights do not fit its config"):
        load_vqvae(tmp_path / "bad.safetensors")
