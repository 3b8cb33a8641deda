"""The PixelSNAIL model: causality, conditioning, configs, initialisation and sampling."""

import json
import math

import pytest
import torch

from bench.common import random_pixels
from prior import PixelSNAIL, PixelSNAILConfig, get_preset
from prior import mixture

SMALL = dict(channels=16, n_blocks=2, n_res_blocks=1, key_channels=4, value_channels=8, dropout=0.0)


def pixel_model(attention=True, shape=(5, 6), **overrides):
    torch.manual_seed(0)
    config = PixelSNAILConfig(shape=shape, n_mixtures=2, attention=attention, **{**SMALL, **overrides})
    model = PixelSNAIL(config)
    model.init_from_data(random_pixels(4, shape))
    return model.double()


def code_model(attention=True, **overrides):
    torch.manual_seed(0)
    config = PixelSNAILConfig(
        shape=(4, 5), n_codes=7, n_classes=3, cond_codes=5, cond_shape=(2, 3), attention=attention,
        embed_channels=8, cond_channels=8, cond_res_blocks=1, **{**SMALL, **overrides},
    )
    model = PixelSNAIL(config)
    model.init_from_data(*code_inputs(4))
    return model.double()


def code_inputs(n):
    return torch.randint(0, 7, (n, 4, 5)), torch.randint(0, 3, (n,)), torch.randint(0, 5, (n, 2, 3))


def test_code_mode_output_and_nll():
    model = code_model()
    codes, label, cond = code_inputs(3)
    logits = model(codes, label, cond)
    assert logits.shape == (3, 7, 4, 5)
    expected = torch.nn.functional.cross_entropy(logits, codes, reduction="none").mean(dim=(1, 2))
    torch.testing.assert_close(model.nll(codes, label, cond).double(), expected / math.log(2), rtol=1e-5, atol=1e-6)


def test_pixel_nll_is_bits_per_dim_of_the_mixture():
    model = pixel_model()
    x = random_pixels(3, (5, 6)).double()
    bits = model.nll(x)
    nats = -mixture.log_prob(x, model(x)).sum(dim=(1, 2))
    torch.testing.assert_close(bits.double(), nats.double() / (3 * 30 * math.log(2)), rtol=1e-5, atol=1e-6)


def test_label_and_top_codes_change_the_output():
    model = code_model()
    codes, label, cond = code_inputs(2)
    base = model(codes, label, cond)
    assert not torch.allclose(base, model(codes, (label + 1) % 3, cond))
    assert not torch.allclose(base, model(codes, label, (cond + 1) % 5))


def test_bad_inputs_are_refused_with_clear_messages():
    model = code_model()
    codes, label, cond = code_inputs(2)
    with pytest.raises(ValueError, match="codes must lie in"):
        model(codes + 7, label, cond)
    with pytest.raises(ValueError, match="label must lie in"):
        model(codes, label + 3, cond)
    with pytest.raises(ValueError, match="label must be given"):
        model(codes, None, cond)
    with pytest.raises(ValueError, match="cond must be integer codes of shape"):
        model(codes, label, cond[:, :1])
    with pytest.raises(ValueError, match="pixel mode expects"):
        pixel_model()(torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_codes=1), "n_codes"),
        (dict(cond_codes=5), "cond_codes and cond_shape"),
        (dict(dropout=1.0), "dropout"),
        (dict(kernel_size=1), "kernel_size"),
        (dict(n_heads=3), "divisible by n_heads"),
        (dict(shape=(0, 4)), "shape"),
        (dict(streams="three"), "streams must be one of auto, one, two"),
        (dict(res_channels=0), "res_channels"),
        (dict(out_res_blocks=-1), "out_res_blocks"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        PixelSNAILConfig(**fields)


def test_config_json_round_trip():
    config = PixelSNAILConfig(shape=(8, 4), n_codes=512, n_classes=10, cond_codes=512, cond_shape=(4, 2))
    assert PixelSNAILConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown PixelSNAILConfig fields"):
        PixelSNAILConfig.from_json('{"shape": [4, 4], "flux_capacitor": 1}')


def test_a_config_written_before_the_streams_field_loads_as_one_stream():
    """Checkpoints of attention-free models trained before two streams existed keep loading."""
    config = PixelSNAILConfig(shape=(8, 8), n_codes=16, attention=False, streams="one")
    legacy = json.loads(config.to_json())
    del legacy["streams"]
    assert PixelSNAILConfig.from_json(json.dumps(legacy)) == config
    assert not config.two_streams and PixelSNAILConfig(attention=False).two_streams


def test_cifar10_preset_has_the_papers_size():
    model = PixelSNAIL(get_preset("cifar10").model)
    n = model.num_parameters()
    assert 45e6 < n < 47e6, n
    assert get_preset("imagenet32").model.n_mixtures == 32 and get_preset("imagenet32").model.dropout == 0.0


def test_data_dependent_init_normalises_the_output():
    torch.manual_seed(0)
    model = PixelSNAIL(PixelSNAILConfig(shape=(6, 6), n_mixtures=2, **SMALL))
    x = random_pixels(16, (6, 6))
    model.init_from_data(x)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(20), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3), unbiased=False), torch.ones(20), atol=1e-3, rtol=0)


def test_sampling_is_seeded_and_on_the_grid():
    model = pixel_model(shape=(3, 3))
    a = model.sample(2, generator=torch.Generator().manual_seed(1))
    b = model.sample(2, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 3, 3) and torch.equal(a, b)
    levels = (a + 1) * 127.5
    torch.testing.assert_close(levels, levels.round())

    codes = code_model()
    _, label, cond = code_inputs(2)
    drawn = codes.sample(2, label, cond, generator=torch.Generator().manual_seed(0), temperature=0.7)
    assert drawn.shape == (2, 4, 5) and drawn.dtype == torch.long and drawn.max() < 7


def test_sampling_follows_the_model():
    """With near-zero temperature, sampled codes are the argmax of the model given the prefix."""
    model = code_model()
    _, label, cond = code_inputs(2)
    drawn = model.sample(2, label, cond, generator=torch.Generator().manual_seed(0), temperature=1e-4)
    greedy = model(drawn, label, cond).argmax(dim=1)
    assert torch.equal(drawn, greedy)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_keeps_one_minus_p_and_the_mean(p):
    from prior.layers import Dropout

    dropout = Dropout(p)
    x = torch.ones(400_000)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005 and abs(y.mean().item() - 1.0) < 0.01
    # both halves of every 32-bit draw keep at the same rate
    pairs = kept.view(-1, 2).float().mean(dim=0)
    assert abs(pairs[0] - pairs[1]) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)), rtol=1e-4, atol=0)
    assert torch.equal(dropout.eval()(x), x)


def test_dropout_mask_follows_the_memory_layout():
    from prior.layers import keep_mask

    x = torch.randn(4, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    keep, keep_probability = keep_mask(x, 0.5)
    assert keep.shape == x.shape and keep.stride() == x.stride() and keep_probability == 0.5
    odd = torch.randn(4, 7, 5, 3)[:, 1:]  # neither layout: falls back to a plain mask
    assert keep_mask(odd, 0.5)[0].shape == odd.shape


@pytest.mark.parametrize("n_heads, key_channels, value_channels", [(1, 16, 128), (2, 8, 4), (4, 16, 16), (1, 16, 8)])
def test_causal_attention_equals_the_masked_softmax_reference(n_heads, key_channels, value_channels):
    """The fused null-key formulation against the plain one: scores, strict lower-triangular mask,
    softmax, zeros at position 0."""
    from einops import rearrange

    from prior.layers import causal_attention

    torch.manual_seed(0)
    query, key = torch.randn(2, key_channels, 5, 7) * 3, torch.randn(2, key_channels, 5, 7) * 3
    value = torch.randn(2, value_channels, 5, 7)
    q, k, v = (rearrange(t, "b (h d) x y -> b h (x y) d", h=n_heads) for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(35, 35, dtype=torch.bool).tril(-1)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    expected = rearrange(weights @ v, "b h (x y) d -> b (h d) x y", x=5)
    torch.testing.assert_close(causal_attention(query, key, value, n_heads), expected, atol=1e-5, rtol=1e-5)


def test_causal_attention_under_bf16_autocast_computes_in_fp32():
    """Under CPU autocast the attention runs in fp32 on the bf16 inputs and returns their dtype."""
    from prior.layers import causal_attention

    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 8, 4, 6).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_attention(query, key, value, n_heads=2)
    expected = causal_attention(query.float(), key.float(), value.float(), n_heads=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), atol=0, rtol=0)


@pytest.mark.parametrize("make_model", [pixel_model, code_model], ids=["pixels", "codes"])
def test_bf16_autocast_forward_is_close_to_fp32(make_model):
    """The fast path (bf16 autocast, fp32 likelihood) against fp32: the same bits/dim to 2%."""
    model = make_model().float().eval()
    if model.config.pixel_mode:
        inputs = (random_pixels(4, model.config.shape).float(),)
    else:
        inputs = code_inputs(4)
    fp32_bits = model.nll(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_bits = model.nll(*inputs)
    assert bf16_bits.dtype == torch.float32
    torch.testing.assert_close(bf16_bits, fp32_bits, rtol=0.02, atol=0)


def test_compiled_model_matches_eager():
    """torch.compile (the trainers' --compile) computes what the eager model computes."""
    model = pixel_model(shape=(4, 4)).float().eval()
    x = random_pixels(2, (4, 4)).float()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
