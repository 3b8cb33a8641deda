"""The VQ-VAE-2 model: shapes, config, training, encode/decode, checkpoints, two levels and more."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modelkit import level_names
from pipelines.store.checkpoint import VQVAE_KIND, CheckpointError, load_pixelsnail, load_vqvae, save_checkpoint
from vqvae import VQVAE2, VQVAE2Config
from vqvae.presets import get_preset

SMALL = dict(top_codes=16, bottom_codes=32, code_dim=8, channels=32, res_channels=16, n_res_blocks=1)
THREE_LEVELS = dict(SMALL, levels=3, middle_codes=24)
# A two-level VQ-VAE (8x8 images, 4 channels, codebooks of 6 and 5 codes) saved by the two-level
# model as it was before the number of levels became a field (commit d7312e8), after one training
# forward, and beside it what that model computed in eval mode: two images, their reconstruction,
# loss, top and bottom codes, and the images decoded from those codes.
FIXTURES = Path(__file__).parent / "fixtures"
TWO_LEVEL_CHECKPOINT = FIXTURES / "vqvae_two_levels.safetensors"
TWO_LEVEL_OUTPUTS = FIXTURES / "vqvae_two_levels_outputs.safetensors"


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


def small_model(**fields):
    torch.manual_seed(0)
    return VQVAE2(VQVAE2Config(**{**SMALL, **fields}))


def codebooks(model):
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


@pytest.fixture(scope="module")
def training_run(fit_vqvae):
    """A small model after 60 Adam steps on 8 smooth 32x32 images -> (model, images, losses)."""
    model = small_model()
    images = smooth_images(8, 32)
    losses = fit_vqvae(model, images, lr=3e-3)
    return model.eval(), images, losses


@pytest.fixture(scope="module")
def three_level_run(fit_vqvae):
    """A small three-level model (grids 2x2, 4x4, 8x8) after 60 Adam steps on 8 smooth 32x32
    images -> (model, images, losses)."""
    model = small_model(**THREE_LEVELS)
    images = smooth_images(8, 32)
    losses = fit_vqvae(model, images, lr=3e-3)
    return model.eval(), images, losses


def test_code_shapes():
    model = small_model()
    assert model.code_shapes(256) == ((32, 32), (64, 64))
    assert model.code_shapes(32) == ((4, 4), (8, 8))
    assert model.code_shapes(8) == ((1, 1), (2, 2))
    for bad in (0, 4, 12, 36):
        with pytest.raises(ValueError, match=r"multiple of 8 and >= 8 \(two levels of stride 4 and 8\)"):
            model.code_shapes(bad)


def test_code_shapes_of_three_levels_and_of_the_ffhq_preset():
    three = small_model(levels=3)
    assert three.code_shapes(64) == ((4, 4), (8, 8), (16, 16))
    assert three.code_shapes(16) == ((1, 1), (2, 2), (4, 4))
    for bad in (8, 24):
        with pytest.raises(ValueError, match=r"multiple of 16 and >= 16 \(three levels of stride 4, 8 and 16\)"):
            three.code_shapes(bad)
    assert small_model(levels=4).code_shapes(64) == ((2, 2), (4, 4), (8, 8), (16, 16))
    with torch.device("meta"):  # no memory for the weights: only the shapes are wanted
        ffhq = VQVAE2(get_preset("vqvae2-ffhq1024").model)
    assert ffhq.code_shapes(1024) == ((32, 32), (64, 64), (128, 128))


def test_level_names():
    assert level_names(2) == ("top", "bottom") and level_names(3) == ("top", "middle", "bottom")
    assert level_names(5) == ("level0", "level1", "level2", "level3", "level4")
    with pytest.raises(ValueError, match="at least 2 levels, got 1"):
        level_names(1)
    assert VQVAE2Config(levels=3, middle_codes=7).codebook_sizes() == (512, 7, 512)
    assert VQVAE2Config(levels=4, middle_codes=7).codebook_sizes() == (512, 7, 7, 512)
    assert VQVAE2Config(levels=3, bottom_stride=8).strides() == (32, 16, 8)


@pytest.mark.parametrize("fields, size",
                         [(dict(levels=3), 32), (dict(levels=4), 32), (dict(levels=3, bottom_stride=8), 64)])
def test_shapes_of_deeper_models(fields, size):
    model = small_model(**fields, middle_codes=24)
    images = smooth_images(2, size)
    out = model(images)
    assert out.reconstruction.shape == images.shape and len(out.levels) == model.config.levels
    assert out.top is out.levels[0] and out.bottom is out.levels[-1]
    codes = model.eval().encode(images)
    assert [tuple(c.shape) for c in codes] == [(2, *shape) for shape in model.code_shapes(size)]
    assert all(c.dtype == torch.long for c in codes)
    for c, n_codes in zip(codes, model.config.codebook_sizes()):
        assert 0 <= c.min() and c.max() < n_codes
    decoded = model.decode_codes(*codes)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1.0


def test_a_two_level_model_has_the_modules_it_always_had():
    """The names (so the state-dict keys) and the order (so the initial weights under a seed and the
    optimizer's parameter order) of the two-level model from before the levels field."""
    names = [name for name, _ in small_model().named_children()]
    assert names == ["encoder_bottom", "encoder_top", "pre_quantize_top", "quantizer_top", "decoder_top",
                     "pre_quantize_bottom", "quantizer_bottom", "upsample_top", "decoder"]
    with safe_open(TWO_LEVEL_CHECKPOINT, framework="pt") as f:
        keys, stored_config = set(f.keys()), f.metadata()["config"]
    assert "levels" not in json.loads(stored_config)  # written before the field: read as two levels
    config = VQVAE2Config.from_json(stored_config)
    assert config.levels == 2 and set(VQVAE2(config).state_dict()) == keys


def test_a_two_level_checkpoint_written_before_the_levels_field_loads_and_computes_what_it_did():
    model, extra = load_vqvae(TWO_LEVEL_CHECKPOINT)
    expected = load_file(TWO_LEVEL_OUTPUTS)
    assert model.config.levels == 2 and extra == {"image_size": 8, "step": 1}
    out = model(expected["images"])
    # floats to rounding: the thread count changes the order of a convolution's sums
    exact = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.reconstruction, expected["reconstruction"], **exact)
    torch.testing.assert_close(out.loss, expected["loss"], **exact)
    top_codes, bottom_codes = model.encode(expected["images"])
    assert torch.equal(top_codes, expected["top_codes"]) and torch.equal(bottom_codes, expected["bottom_codes"])
    torch.testing.assert_close(model.decode_codes(top_codes, bottom_codes), expected["decoded"], **exact)


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
    assert (config.levels, config.bottom_stride) == (2, 4)
    assert VQVAE2Config.from_json(config.to_json()) == config
    small = VQVAE2Config(**THREE_LEVELS, dead_code_threshold=0.5)
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
        ("levels", 1, "levels must be >= 2"),
        ("bottom_stride", 2, "bottom_stride must be a power of two >= 4"),
        ("bottom_stride", 12, "bottom_stride must be a power of two >= 4"),
        ("middle_codes", 1, "middle_codes must be >= 2"),
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
    with pytest.raises(ValueError, match=r"expected 2 code grids \(top codes, bottom codes\), got 1"):
        model.decode_codes(top_codes)
    three = small_model(**THREE_LEVELS).eval()
    top_codes, middle_codes = top_codes[:, :2, :2], bottom_codes[:, :4, :4]  # three levels of 32x32 images
    with pytest.raises(ValueError, match=r"middle codes must have shape \(1, 4, 4\) for top codes of shape "
                                         r"\(1, 2, 2\), got \(1, 8, 8\)"):
        three.decode_codes(top_codes, bottom_codes, middle_codes)  # out of order
    with pytest.raises(ValueError, match=r"middle codes must lie in \[0, 24\)"):
        three.decode_codes(top_codes, middle_codes + 24, bottom_codes)
    assert three.decode_codes(top_codes, middle_codes, bottom_codes).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("run", ["training_run", "three_level_run"])
def test_training_lowers_the_reconstruction_error(run, request):
    _, _, losses = request.getfixturevalue(run)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("run", ["training_run", "three_level_run"])
def test_decoding_the_codes_gives_the_reconstruction(run, request):
    model, images, _ = request.getfixturevalue(run)
    out = model(images)
    codes = model.encode(images)
    assert len(codes) == model.config.levels
    decoded = model.decode_codes(*codes)
    assert torch.allclose(decoded, out.reconstruction.clamp(-1, 1), atol=1e-5)


def test_every_level_of_a_trained_three_level_model_is_used_and_matters(three_level_run):
    """Each level's codes reach the image: decoding with one level's codes replaced changes it."""
    model, images, _ = three_level_run
    codes = model.encode(images)
    decoded = model.decode_codes(*codes)
    for k, level_codes in enumerate(codes):
        assert len(level_codes.unique()) > 1, f"level {k} uses one code"
        other = list(codes)
        other[k] = (level_codes + 1) % model.config.codebook_sizes()[k]
        assert (model.decode_codes(*other) - decoded).abs().max() > 1e-3, f"level {k} does not matter"


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
