"""Causality of every PixelSNAIL configuration: the output at a position depends on no input at
that position or later (raster order, and RGB order within a pixel), and on every input before
it (no blind spot), with attention or without it (then through the vertical stream)."""

import pytest
import torch
from einops import rearrange

from bench.common import random_inputs
from prior import PixelSNAIL, PixelSNAILConfig, get_preset, mixture
from prior.presets import PRESETS

SHAPE = (6, 6)
N_POSITIONS = SHAPE[0] * SHAPE[1]
# tiny widths; two blocks of one gated resnet reach every position of a 6x6 grid at kernel 2
TINY = dict(channels=8, key_channels=4, value_channels=8, dropout=0.0, embed_channels=4, cond_channels=4)
SMALL = dict(n_blocks=2, n_res_blocks=1, cond_res_blocks=1, **TINY)
CODES = dict(n_codes=5, n_classes=3, cond_codes=4, cond_shape=(3, 3))


def model_inputs(config, n):
    """(x, label, cond) of the kinds the config takes, None where it takes none."""
    return random_inputs(config, n, torch.Generator().manual_seed(n))


def build(config):
    torch.manual_seed(0)
    model = PixelSNAIL(config)
    model.init_from_data(*model_inputs(config, 4))
    return model.double().eval()


def dependence(model):
    """(N, N): |d output at p / d input at q| summed over channels, positions in raster order.

    One backward pass: a batch of N copies of one input, copy p summing its output at p. Codes
    are discrete, so code mode differentiates with respect to the embedding each code looks up.
    """
    x, label, cond = (None if t is None else t.expand(N_POSITIONS, *t.shape[1:]) for t in model_inputs(model.config, 1))
    embedded = []
    if model.config.pixel_mode:
        x = x.double().clone().requires_grad_(True)
        embedded.append(x)
        out = model(x, label, cond)
    else:
        hook = model.embed.register_forward_hook(lambda m, inputs, out: embedded.append(out.retain_grad() or out))
        out = model(x, label, cond)
        hook.remove()
    out = rearrange(out, "b p h w -> b (h w) p")
    positions = torch.arange(N_POSITIONS)
    out[positions, positions].sum().backward()
    grad = embedded[0].grad
    if model.config.pixel_mode:
        return rearrange(grad.abs(), "b c h w -> b (h w) c").sum(-1)
    return rearrange(grad.abs(), "b h w c -> b (h w) c").sum(-1)


def check_strictly_causal_without_blind_spot(model):
    seen = dependence(model)
    later = torch.ones(N_POSITIONS, N_POSITIONS, dtype=torch.bool).triu()  # q >= p
    assert torch.all(seen[later] == 0), "an output depends on its own position or a later one"
    blind = [(p, q) for p, q in (~later).nonzero().tolist() if seen[p, q] == 0]
    assert not blind, f"blind spots (output, input position): {blind[:5]}"


GRID = [
    (mode, kernel_size, attention, streams)
    for mode in ("pixels", "codes")
    for kernel_size in (2, 3, 4, 5)
    for attention, streams in ((True, "auto"), (True, "two"), (False, "auto"))
]


@pytest.mark.parametrize("mode, kernel_size, attention, streams", GRID)
def test_every_configuration_is_strictly_causal_without_blind_spot(mode, kernel_size, attention, streams):
    """Pixel mode with a class label, code mode with a class label and a conditioning code grid."""
    condition = dict(n_mixtures=2, n_classes=3) if mode == "pixels" else CODES
    config = PixelSNAILConfig(shape=SHAPE, kernel_size=kernel_size, attention=attention, streams=streams,
                              **condition, **SMALL)
    assert config.two_streams == (streams == "two" or not attention)
    check_strictly_causal_without_blind_spot(build(config))


def tiny_version(name):
    """The preset's structure (blocks, kernel, attention, streams, residual units, output and
    conditioning stacks) at tiny widths on a 6x6 grid; code presets with a label and a code grid."""
    preset = get_preset(name).model
    overrides = dict(shape=SHAPE, res_channels=preset.res_channels and 6, **TINY)
    overrides.update(key_channels=2 * preset.n_heads, value_channels=2 * preset.n_heads)
    if not preset.pixel_mode:
        overrides.update(n_codes=5, n_classes=3)
        if preset.cond_codes is not None:
            overrides.update(cond_codes=4, cond_shape=(3, 3))
    return get_preset(name, **overrides).model


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_strictly_causal_without_blind_spot(name):
    check_strictly_causal_without_blind_spot(build(tiny_version(name)))


@pytest.mark.parametrize("mode", ["pixels", "codes"])
@pytest.mark.parametrize("kernel_size", [2, 3])
def test_one_stream_without_attention_has_the_blind_spot(mode, kernel_size):
    """Why the second stream exists: after the first layer every conv reads up and to the left,
    so the output at (i, j) never sees a position more than k - 1 columns to its right."""
    condition = dict(n_mixtures=2) if mode == "pixels" else CODES
    config = PixelSNAILConfig(shape=SHAPE, kernel_size=kernel_size, attention=False, streams="one",
                              **condition, **SMALL)
    seen = dependence(build(config))
    width = SHAPE[1]
    for p in range(N_POSITIONS):
        i, j = divmod(p, width)
        for q in range(p):
            row, column = divmod(q, width)
            if column > j + kernel_size - 1:
                assert seen[p, q] == 0, f"{(i, j)} sees {(row, column)}"
    assert seen[5 * width, width - 1] == 0 and seen[5 * width, 4 * width] > 0  # (5, 0): not (0, 5), but (4, 0)


@pytest.mark.parametrize("attention, streams", [(True, "auto"), (True, "two"), (False, "auto")])
def test_pixel_mode_is_causal_in_channel_order(attention, streams):
    """The likelihood of channel c at a pixel depends on channels < c there, never on c' > c."""
    config = PixelSNAILConfig(shape=SHAPE, n_mixtures=2, attention=attention, streams=streams, **SMALL)
    model = build(config)
    x = model_inputs(config, 2)[0].double().requires_grad_(True)
    log_probs = mixture.channel_log_probs(x, model(x))  # (B, 3, M, H, W)
    i, j = 2, 3
    for c in range(3):
        (grad,) = torch.autograd.grad(log_probs[0, c, :, i, j].sum(), x, retain_graph=True)
        assert torch.all(grad[0, c + 1 :, i, j] == 0), f"channel {c} sees a later channel"
        assert torch.all(grad[0, :c, i, j] != 0), f"channel {c} is blind to an earlier channel"
        assert torch.all(grad[0, :, i, j + 1 :] == 0) and torch.all(grad[0, :, i + 1 :] == 0)


# -- attention dropout: training drops attention weights; that adds no dependence, and sampling
# (always in eval mode) is unaffected


def attention_dropout_model(mode):
    condition = dict(n_mixtures=2, n_classes=3) if mode == "pixels" else CODES
    config = PixelSNAILConfig(shape=SHAPE, attention=True, n_heads=2, attention_dropout=0.5, **condition, **SMALL)
    return build(config)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["pixels", "codes"])
def test_attention_dropout_is_strictly_causal_in_training_and_without_blind_spot_in_eval(mode):
    model = attention_dropout_model(mode)
    check_strictly_causal_without_blind_spot(model)  # eval mode: no dropout
    model.train()  # every copy of the batch draws its own dropout mask: some dependences vanish, none appear
    seen = dependence(model)
    later = torch.ones(N_POSITIONS, N_POSITIONS, dtype=torch.bool).triu()
    assert torch.all(seen[later] == 0), "with attention dropout an output depends on its own position or a later one"
    assert seen[~later].count_nonzero() > seen[~later].numel() // 2  # a real dependence map, not all zeros
    x, label, cond = model_inputs(model.config, 2)
    if model.config.pixel_mode:
        x = x.double()
    assert not torch.equal(model(x, label, cond), model(x, label, cond)), "attention dropout is off in training"
    model.eval()
    assert torch.equal(model(x, label, cond), model(x, label, cond))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode, training", [("pixels", False), ("codes", False), ("codes", True)])
def test_attention_dropout_leaves_the_cached_sampler_equal_to_the_naive_one(mode, training):
    """Sampling runs in eval mode (a model in training mode is switched for it), so the cached
    sampler, which has no dropout of its own, draws what the naive one draws."""
    from prior.sampling import sample_cached

    model = attention_dropout_model(mode).float().train(training)
    _, label, cond = model_inputs(model.config, 3)
    naive = model.sample(3, label, cond, torch.Generator().manual_seed(1), cache=False)
    cached = sample_cached(model, 3, label, cond, torch.Generator().manual_seed(1))
    assert torch.equal(cached, naive) and model.training == training
