"""The cached sampler: same draws as the naive one, every position's output, linear memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.common import random_pixels
from prior import PixelSNAIL, PixelSNAILConfig
from prior.sampling import IncrementalPixelSNAIL, sample_cached

SMALL = dict(channels=16, n_blocks=2, n_res_blocks=1, key_channels=4, value_channels=8, dropout=0.0)
CODES = dict(n_codes=7, embed_channels=8, cond_channels=8, cond_res_blocks=1)


def trained_looking(config, *init_inputs):
    """A model whose every weight matters: data-dependent init, then noise on every parameter."""
    torch.manual_seed(0)
    model = PixelSNAIL(config)
    model.init_from_data(*init_inputs)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def pixel_case(shape=(5, 6), n_classes=0, **overrides):
    """(model, label, cond) in pixel mode; label only when n_classes > 0."""
    config = PixelSNAILConfig(shape=shape, n_mixtures=2, n_classes=n_classes, **{**SMALL, **overrides})
    label = torch.arange(3) % n_classes if n_classes else None
    init_label = torch.arange(4) % n_classes if n_classes else None
    return trained_looking(config, random_pixels(4, shape), init_label), label, None


def code_case(conditioned=True, **overrides):
    """(model, label, cond) in code mode, on a 4x5 grid conditioned on a 2x3 grid and a class."""
    condition = dict(n_classes=3, cond_codes=5, cond_shape=(2, 3)) if conditioned else {}
    config = PixelSNAILConfig(shape=(4, 5), **CODES, **condition, **{**SMALL, **overrides})

    def inputs(n):
        if not conditioned:
            return None, None
        return torch.randint(0, 3, (n,)), torch.randint(0, 5, (n, 2, 3))

    model = trained_looking(config, torch.randint(0, 7, (4, 4, 5)), *inputs(4))
    return (model, *inputs(3))


PIXEL_CASES = {
    "pixels, attention": lambda: pixel_case(),
    "pixels, no attention (two streams)": lambda: pixel_case(attention=False),
    "pixels, no attention, one stream": lambda: pixel_case(attention=False, streams="one"),
    "pixels, class label, 2 heads, kernel 3": lambda: pixel_case(n_classes=3, n_heads=2, kernel_size=3),
}
CODE_CASES = {
    "codes, label + cond + attention": lambda: code_case(),
    "codes, no attention (two streams), no condition": lambda: code_case(conditioned=False, attention=False),
    "codes, label + cond, two streams, residual units, kernel 5": lambda: code_case(
        attention=False, kernel_size=5, res_channels=12, n_res_blocks=2
    ),
    "codes, label + cond, attention + two streams, output stack, kernel 4": lambda: code_case(
        streams="two", kernel_size=4, res_channels=12, out_res_blocks=2, n_heads=2
    ),
    "codes, label + cond, 2 heads, kernel 3": lambda: code_case(n_heads=2, kernel_size=3),
}
CASES = {**PIXEL_CASES, **CODE_CASES}


@pytest.mark.parametrize("case, temperature", [(case, 1.0) for case in CASES] + [(case, 0.7) for case in CODE_CASES])
def test_cached_sampler_draws_exactly_what_the_naive_one_draws(case, temperature):
    model, label, cond = CASES[case]()
    naive_generator, cached_generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    naive = model.sample(3, label, cond, naive_generator, temperature, cache=False)
    cached = sample_cached(model, 3, label, cond, cached_generator, temperature)
    assert cached.dtype == naive.dtype and torch.equal(cached, naive)
    assert torch.equal(cached_generator.get_state(), naive_generator.get_state())  # consumed alike


@pytest.mark.parametrize("case", CASES)
def test_output_at_every_position_matches_the_full_forward(case):
    """Teacher forcing: fed a fixed grid position by position, the incremental network gives the
    full forward's output everywhere (up to summation order)."""
    model, label, cond = CASES[case]()
    model.eval()
    c = model.config
    height, width = c.shape
    x = random_pixels(3, c.shape) if c.pixel_mode else torch.randint(0, c.n_codes, (3, *c.shape))
    with torch.no_grad():
        full = model(x, label, cond)
        network = IncrementalPixelSNAIL(model, 3, model.condition(3, label, cond))
        for i in range(height):
            for j in range(width):
                torch.testing.assert_close(network.output_at(i, j), full[:, :, i : i + 1, j : j + 1])
                network.write(i, j, x[..., i : i + 1, j : j + 1])


def test_training_mode_is_restored_and_dropout_is_off_while_sampling():
    model, _, _ = pixel_case(dropout=0.5)
    model.train()
    naive = model.sample(2, generator=torch.Generator().manual_seed(3), cache=False)
    cached = sample_cached(model, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cached, naive) and model.training


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "two streams"])
def test_memory_is_linear_in_the_number_of_positions(attention):
    """On a 16x16 grid (N = 256) the cached sampler creates no tensor anywhere near N x N
    elements: no attention matrix over the grid, only per-layer grids of activations."""
    shape = (16, 16)
    n_positions = shape[0] * shape[1]
    model, _, _ = pixel_case(shape=shape, channels=8, n_blocks=1, n_heads=2, attention=attention)
    with LargestTensor() as largest:
        samples = sample_cached(model, 2, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, *shape)
    assert 2 * 8 * n_positions <= largest.numel < n_positions**2 / 10  # sees the (B, C, H, W) buffers


def test_bad_temperature_is_refused():
    model, _, _ = pixel_case()
    with pytest.raises(ValueError, match="code mode only"):
        sample_cached(model, 1, temperature=0.5)
    codes, label, cond = code_case()
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be > 0 and finite"):
            sample_cached(codes, 1, label[:1], cond[:1], temperature=temperature)


def test_under_autocast_the_sampler_casts_each_weight_once_and_keeps_the_head_in_fp32():
    """Autocast would cast every weight at every position; the sampler keeps bf16 copies instead
    (same values), and the head in fp32 as PixelSNAIL.output runs it."""
    model, label, cond = code_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        network = IncrementalPixelSNAIL(model, 3, model.condition(3, label, cond))
        samples = sample_cached(model, 3, label, cond, torch.Generator().manual_seed(0))
    assert network.blocks[0].res_blocks[0].conv1.weight.dtype == torch.bfloat16
    assert network.head.weight.dtype == torch.float32
    assert samples.shape == (3, 4, 5) and 0 <= samples.min() and samples.max() < 7


def per_example_generators(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.mark.parametrize("case", ["pixels, attention", "codes, label + cond + attention"])
def test_one_generator_per_example_draws_each_example_as_if_alone(case):
    """With a list of generators, example k draws from generator k only: the cached sampler equals
    the naive one, and each example of the batch equals the same example sampled alone."""
    model, label, cond = CASES[case]()
    seeds = [11, 12, 13]
    naive = model.sample(3, label, cond, per_example_generators(seeds), cache=False)
    cached = sample_cached(model, 3, label, cond, per_example_generators(seeds))
    assert torch.equal(cached, naive)
    for k in range(3):
        alone = sample_cached(model, 1, None if label is None else label[k : k + 1],
                              None if cond is None else cond[k : k + 1], per_example_generators(seeds[k : k + 1]))
        assert torch.equal(alone, cached[k : k + 1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample_cached(model, 3, label, cond, per_example_generators(seeds[:2]))


def random_grid(model, n):
    c = model.config
    return random_pixels(n, c.shape) if c.pixel_mode else torch.randint(0, c.n_codes, (n, *c.shape))


@pytest.mark.parametrize("case", CASES)
def test_with_a_prefix_the_cached_sampler_draws_what_the_naive_one_draws_and_keeps_the_prefix(case):
    """Kept positions end mid-row (a two-stream model's next row starts inside the prefix)."""
    model, label, cond = CASES[case]()
    width = model.config.shape[1]
    kept = width + 2
    prefix = random_grid(model, 3)
    naive_generator, cached_generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    naive = model.sample(3, label, cond, naive_generator, cache=False, prefix=prefix, kept=kept)
    cached = sample_cached(model, 3, label, cond, cached_generator, prefix=prefix, kept=kept)
    assert torch.equal(cached, naive)
    assert torch.equal(cached_generator.get_state(), naive_generator.get_state())
    flat, flat_prefix = cached.flatten(-2), prefix.flatten(-2)  # (..., H * W) in raster order
    assert torch.equal(flat[..., :kept], flat_prefix[..., :kept].to(flat))
    assert not torch.equal(flat[..., kept:], flat_prefix[..., kept:].to(flat))


def test_a_whole_prefix_comes_back_and_bad_prefixes_are_refused():
    model, label, cond = code_case()
    prefix = random_grid(model, 3)
    assert torch.equal(sample_cached(model, 3, label, cond, prefix=prefix, kept=20), prefix)
    with pytest.raises(ValueError, match="kept must lie in"):
        sample_cached(model, 3, label, cond, prefix=prefix, kept=21)
    with pytest.raises(ValueError, match="needs a prefix of the samples' shape"):
        sample_cached(model, 3, label, cond, kept=2)
    with pytest.raises(ValueError, match="needs a prefix of the samples' shape"):
        sample_cached(model, 3, label, cond, prefix=prefix[:2], kept=2)
