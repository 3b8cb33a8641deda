"""The presets: the paper's VQ-VAE-2 priors as its appendix table gives them, and the size of
every other preset kept as it was before the fields they need were added."""

import pytest
import torch

from prior import PixelSNAIL, PixelSNAILConfig, get_preset
from prior.layers import AttentionBlock, Dropout, GatedResBlock
from prior.presets import PRESETS

# every preset's parameter count (the README's table), with the grid and codebook of the preset
PARAMETERS = {
    "cifar10": 46_021_908,
    "imagenet32": 46_078_668,
    "cpu-small": 297_990,
    "vqvae2-top": 646_504_640,
    "vqvae2-bottom": 628_722_176,
    "vqvae2-top-256ch": 105_867_760,
    "vqvae2-bottom-256ch": 239_057_664,
    "vqvae2-ffhq-top": 646_504_640,
    "vqvae2-ffhq-middle": 628_722_176,
    "vqvae2-ffhq-bottom": 628_722_176,  # the middle's network: convolutions, whatever the grid
    "cpu-top": 630_240,
    "cpu-bottom": 1_255_104,
    "tiny": 7_821,
}
# the counts before res_channels, out_res_blocks and streams existed (vqvae2-*-256ch were then
# vqvae2-top / vqvae2-bottom): the new fields' defaults, with one stream, rebuild those models
PARAMETERS_BEFORE = {
    "cifar10": 46_021_908,
    "imagenet32": 46_078_668,
    "cpu-small": 297_990,
    "vqvae2-top-256ch": 105_867_760,
    "vqvae2-bottom-256ch": 137_254_912,
    "cpu-top": 630_240,
    "cpu-bottom": 758_272,
    "tiny": 7_821,
}


def on_meta(config):
    """The model without memory for its weights: the paper's priors have over 600M parameters."""
    with torch.device("meta"):
        return PixelSNAIL(config)


def test_every_preset_is_listed():
    assert set(PARAMETERS) == set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count(name):
    assert on_meta(get_preset(name).model).num_parameters() == PARAMETERS[name]


@pytest.mark.parametrize("name", PARAMETERS_BEFORE)
def test_one_stream_rebuilds_the_models_of_before(name):
    assert on_meta(get_preset(name, streams="one").model).num_parameters() == PARAMETERS_BEFORE[name]


def gated_resnets(blocks):
    return [m for m in blocks.modules() if isinstance(m, GatedResBlock) and m.conv1.conv.kernel_size != (1, 1)]


def check_residual_units(resnets, channels, res_channels, kernel_size):
    for resnet in resnets:
        assert resnet.conv1.conv.in_channels == channels and resnet.conv1.conv.out_channels == res_channels
        assert resnet.conv1.conv.kernel_size == (kernel_size, kernel_size)
        assert resnet.conv2.conv.kernel_size == (1, 1) and resnet.conv2.conv.out_channels == 2 * channels


def check_dropout(model, p):
    dropouts = [m for m in model.modules() if isinstance(m, Dropout)]
    assert dropouts and all(m.p == p for m in dropouts)


def test_vqvae2_top_is_the_papers_top_prior():
    """32x32, 512 hidden, 2048 residual units, 20 gated resnets, 4 attention layers of 8 heads,
    5x5 convs, dropout 0.1, an output stack of 20."""
    config = get_preset("vqvae2-top").model
    model = on_meta(config)
    assert config.shape == (32, 32) and config.n_codes == 512 and not config.two_streams
    resnets = [resnet for block in model.blocks for resnet in block.res_blocks]
    assert len(resnets) == 20 and len(gated_resnets(model.blocks)) == 20
    check_residual_units(resnets, 512, 2048, 5)
    attention = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(attention) == 4 and all(block.n_heads == 8 for block in attention)
    assert all(block.attention_dropout == 0.1 for block in attention)
    assert len(model.out_blocks) == 20
    for block in model.out_blocks:
        assert block.conv1.conv.kernel_size == (1, 1) and block.conv1.conv.out_channels == 2048
    check_dropout(model, 0.1)


def test_vqvae2_bottom_is_the_papers_bottom_prior():
    """64x64 conditioned on the 32x32 top codes, 512 hidden, 1024 residual units, 20 gated
    resnets in two streams, no attention, 5x5 convs, dropout 0.1, a conditioning stack of 20."""
    config = get_preset("vqvae2-bottom").model
    model = on_meta(config)
    assert config.shape == (64, 64) and config.cond_shape == (32, 32) and config.two_streams
    (block,) = model.blocks
    assert len(block.res_blocks) == 20 and len(block.vertical) == 20
    check_residual_units(block.res_blocks, 512, 1024, 5)
    check_residual_units(block.vertical, 512, 1024, 5)  # 5 rows x 5 columns above
    assert block.attention is None and not any(isinstance(m, AttentionBlock) for m in model.modules())
    assert len(model.cond_stack.blocks) == 20 and len(model.out_blocks) == 0
    check_dropout(model, 0.1)


@pytest.mark.parametrize("name, shape, cond_shape, attention", [
    ("vqvae2-ffhq-top", (32, 32), None, True),
    ("vqvae2-ffhq-middle", (64, 64), (32, 32), False),
    ("vqvae2-ffhq-bottom", (128, 128), (64, 64), False),
])
def test_the_ffhq_priors_model_each_level_given_the_one_above(name, shape, cond_shape, attention):
    """The paper's FFHQ-1024 maps, each level conditioned on the level above; no classes."""
    config = get_preset(name).model
    assert (config.shape, config.cond_shape, config.attention, config.n_classes) == (shape, cond_shape, attention, 0)
    assert config.n_codes == 512 and config.cond_codes == (512 if cond_shape else None)


def test_attention_dropout_is_on_in_the_papers_attention_priors_only():
    """The paper's priors drop attention weights (its top prior and the narrower one built from it);
    every other preset and every config written before the field keeps the model it had."""
    with_dropout = {name for name, preset in PRESETS.items() if preset.model.attention_dropout}
    assert with_dropout == {"vqvae2-top", "vqvae2-top-256ch", "vqvae2-ffhq-top"}
    assert get_preset("vqvae2-top-256ch").model.attention_dropout == 0.1
    stored = PixelSNAILConfig().to_json().replace(', "attention_dropout": 0.0', "")
    assert "attention_dropout" not in stored and PixelSNAILConfig.from_json(stored).attention_dropout == 0.0


@pytest.mark.parametrize("fields, message", [
    (dict(attention_dropout=1.0), r"attention_dropout must be in \[0, 1\), got 1.0"),
    (dict(attention_dropout=-0.1), r"attention_dropout must be in \[0, 1\), got -0.1"),
    (dict(attention_dropout=0.1, attention=False), r"attention_dropout needs attention \(attention=True\)"),
])
def test_bad_attention_dropout_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        PixelSNAILConfig(**fields)


def test_causal_attention_dropout_keeps_the_expected_output():
    """Dropping weights with probability p and scaling the rest by 1/(1 - p) keeps each output's
    mean: averaged over many draws it approaches the output without dropout; position 0 stays 0."""
    from prior.layers import causal_attention

    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 2, 8, 2, 3, generator=generator)  # (B, Ck, H, W) = (2, 8, 2, 3) each
    value = torch.randn(2, 4, 2, 3, generator=generator)  # (B, Cv, H, W)
    expected = causal_attention(query, key, value, n_heads=2)
    torch.manual_seed(0)
    n = 4000  # copies of the batch in one call: each example draws its own mask
    copies = (t.repeat(n, 1, 1, 1) for t in (query, key, value))
    draws = causal_attention(*copies, n_heads=2, dropout=0.3).reshape(n, *expected.shape)
    assert not torch.equal(draws[0], expected) and torch.all(draws[:, :, :, 0, 0] == 0)
    torch.testing.assert_close(draws.mean(0), expected, atol=0.05, rtol=0)
