"""The cached sampler: same draws as the naive one, every position's output, linear memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.common import random_pixels
from prior import PixelSNAIL, PixelSNAILConfig
from prior.drawing import Drawing, draw_codes, truncate
from prior.noise import SampleKeys
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
    # taller than the kernel: the convs' rings of input rows wrap around, several times
    "pixels, two streams, residual units, kernel 5, 13 rows": lambda: pixel_case(
        shape=(13, 6), attention=False, kernel_size=5, res_channels=12
    ),
    "pixels, attention, kernel 4, 11 rows": lambda: pixel_case(shape=(11, 5), kernel_size=4, n_heads=2),
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
    elements: no attention matrix over the grid, only the keys and values and rows of activations."""
    shape = (16, 16)
    n_positions = shape[0] * shape[1]
    model, _, _ = pixel_case(shape=shape, channels=8, n_blocks=1, n_heads=2, attention=attention)
    with LargestTensor() as largest:
        samples = sample_cached(model, 2, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, *shape)
    assert 2 * 8 * shape[1] <= largest.numel < n_positions**2 / 10  # sees the (B, C, rows, W) buffers


def test_each_conv_keeps_only_the_rows_of_input_its_kernel_reads():
    """kernel height + 1 rows (those read and the one being written), however tall the grid."""
    for height in (6, 30):
        model, _, _ = pixel_case(shape=(height, 6), attention=False, kernel_size=5, res_channels=12)
        network = IncrementalPixelSNAIL(model, 2, None)
        block = network.blocks[0]
        convs = [network.input.above, network.input.left, network.vertical_input.conv,
                 block.res_blocks[0].conv1, block.vertical[0].conv1]
        assert [conv.inputs.rows.shape[1] for conv in convs] == [5, 6, 6, 6, 6]  # above: a 4 x 9 kernel


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
    conv1 = network.blocks[0].res_blocks[0].conv1
    assert conv1.weight_above.dtype == conv1.weight_last.dtype == torch.bfloat16
    assert network.head.weight.dtype == torch.float32
    assert samples.shape == (3, 4, 5) and 0 <= samples.min() and samples.max() < 7


@pytest.mark.parametrize("case", ["pixels, attention", "codes, label + cond + attention"])
def test_per_sample_keys_draw_each_example_as_if_alone(case):
    """With per-sample keys, example k's draws depend on its key alone: the cached sampler equals
    the naive one, and each example of the batch equals the same example sampled alone."""
    model, label, cond = CASES[case]()
    indices = [11, 12, 13]
    naive = model.sample(3, label, cond, SampleKeys.of(5, indices), cache=False)
    cached = sample_cached(model, 3, label, cond, SampleKeys.of(5, indices))
    assert torch.equal(cached, naive)
    for k in range(3):
        alone = sample_cached(model, 1, None if label is None else label[k : k + 1],
                              None if cond is None else cond[k : k + 1], SampleKeys.of(5, indices[k : k + 1]))
        assert torch.equal(alone, cached[k : k + 1])
    with pytest.raises(ValueError, match="2 sample keys for a batch of 3"):
        sample_cached(model, 3, label, cond, SampleKeys.of(5, indices[:2]))


def test_keyed_draws_follow_the_distribution_at_every_temperature():
    """Gumbel-max over keyed uniforms: the codes drawn for 20,000 samples at one position follow
    softmax(logits / T), with top-p truncating the same distribution; different positions and
    levels give different draws."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).expand(20_000, -1)
    keys = SampleKeys.of(0, range(20_000))
    for temperature in (0.5, 1.0, 3.0):
        for top_p in (None, 0.8):
            drawing = Drawing(temperature, top_p=top_p)
            codes = draw_codes(logits, keys.uniform(7, 5), drawing)
            target = torch.softmax(truncate(logits[:1], top_p=top_p, temperature=temperature) / temperature, dim=1)[0]
            empirical = torch.bincount(codes, minlength=5) / len(codes)
            assert (empirical - target).abs().sum() < 0.03, (temperature, top_p, empirical, target)
    assert not torch.equal(keys.uniform(7, 5), keys.uniform(8, 5))
    assert not torch.equal(keys.uniform(7, 5), keys.at_level("bottom").uniform(7, 5))


def test_keyed_uniforms_at_host_positions_equal_the_hash_of_each_position_and_stay_pinned():
    """An int position reads a chunk hashed at once (the eager samplers), a 0-dim tensor is hashed
    alone (a compiled or captured step): the same numbers at every position, across chunks and
    back, and the numbers samples were drawn from so far (pinned: samples must not change)."""
    from prior.noise import CHUNK, UNIFORM_BITS

    keys = SampleKeys.of(3, [0, 1]).at_level("top")
    for position in (0, 5, CHUNK - 1, CHUNK, 2 * CHUNK + 3, 5):
        for count in (3, 7):
            assert torch.equal(keys.uniform(position, count), keys.uniform(torch.tensor(position), count))
    pinned = [[7317480, 5241578, 2343953], [2904668, 416056, 3760742]]
    assert (keys.uniform(33, 3) * 2**UNIFORM_BITS - 0.5).round().long().tolist() == pinned


@pytest.mark.parametrize("options", [dict(temperature=1e-38), dict(temperature=5e-324, top_p=0.5),
                                     dict(temperature=1e-30, top_k=3, top_p=0.9)], ids=["1e-38", "5e-324 top-p", "1e-30 top-k top-p"])
def test_a_tiny_temperature_draws_the_argmax_without_overflow(options):
    """Below fp32's range logits / T overflow: the draw stays finite and is the greedy one."""
    model, label, cond = code_case()
    codes = sample_cached(model, 3, label, cond, SampleKeys.of(0, range(3)), **options)
    with torch.no_grad():
        logits = model.eval()(codes, label, cond)
    assert torch.equal(codes, logits.argmax(dim=1))
    assert torch.equal(codes, model.sample(3, label, cond, SampleKeys.of(0, range(3)), cache=False, **options))


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


def test_top_k_keeps_the_k_largest_and_top_p_the_smallest_set_reaching_p():
    torch.manual_seed(0)
    logits = torch.randn(50, 9)
    for k in (1, 3, 9):
        kept = truncate(logits, top_k=k) > -torch.inf
        assert torch.equal(kept, torch.zeros_like(kept).scatter(1, logits.topk(k, dim=1).indices, True))
    for p in (0.05, 0.5, 0.9, 1.0):
        kept = truncate(logits, top_p=p) > -torch.inf
        probs = torch.softmax(logits, dim=1)
        for row in range(len(logits)):
            order = probs[row].argsort(descending=True)
            size = int((probs[row][order].cumsum(0) < p - 1e-6).sum()) + 1  # the smallest set whose mass >= p
            assert kept[row].sum() == min(size, 9) and kept[row][order[:size]].all()
    both = truncate(logits, top_k=2, top_p=0.99) > -torch.inf
    assert (both.sum(dim=1) <= 2).all()


def test_top_k_1_draws_the_argmax_at_every_position():
    model, label, cond = code_case()
    codes = sample_cached(model, 3, label, cond, torch.Generator().manual_seed(0), temperature=0.7, top_k=1)
    with torch.no_grad():
        logits = model.eval()(codes, label, cond)  # causal: the logits at p see codes before p only
    assert torch.equal(codes, logits.argmax(dim=1))


CONTROLS = {"top-k 3": dict(top_k=3), "top-p 0.8": dict(top_p=0.8), "top-k 4, top-p 0.6, T 0.7": dict(
    top_k=4, top_p=0.6, temperature=0.7)}


@pytest.mark.parametrize("case", CODE_CASES)
@pytest.mark.parametrize("controls", CONTROLS)
def test_with_top_k_and_top_p_the_cached_sampler_draws_what_the_naive_one_draws(case, controls):
    model, label, cond = CODE_CASES[case]()
    naive = model.sample(3, label, cond, torch.Generator().manual_seed(1), cache=False, **CONTROLS[controls])
    cached = sample_cached(model, 3, label, cond, torch.Generator().manual_seed(1), **CONTROLS[controls])
    assert torch.equal(cached, naive)
    plain = sample_cached(model, 3, label, cond, torch.Generator().manual_seed(1))
    assert not torch.equal(cached, plain)  # the controls change the draws


GUIDED_CASES = {
    "label + cond + attention": lambda: code_case(label_dropout=0.1),
    "label + cond, two streams": lambda: code_case(label_dropout=0.1, attention=False, kernel_size=3),
    "label + cond, attention + two streams, output stack": lambda: code_case(
        label_dropout=0.1, streams="two", out_res_blocks=1, n_heads=2),
}


@pytest.mark.parametrize("case", GUIDED_CASES)
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_with_guidance_the_cached_sampler_draws_what_the_naive_one_draws(case, scale):
    model, label, cond = GUIDED_CASES[case]()
    prefix = random_grid(model, 3)
    for options in (dict(guidance=scale), dict(guidance=scale, top_p=0.9, prefix=prefix, kept=7)):
        naive_generator, cached_generator = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        naive = model.sample(3, label, cond, naive_generator, cache=False, **options)
        cached = sample_cached(model, 3, label, cond, cached_generator, **options)
        assert torch.equal(cached, naive)
        assert torch.equal(cached_generator.get_state(), naive_generator.get_state())


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "naive"])
def test_guidance_1_draws_exactly_what_plain_conditional_sampling_draws(cache):
    model, label, cond = GUIDED_CASES["label + cond + attention"]()
    plain = model.sample(3, label, cond, torch.Generator().manual_seed(5), 0.8, cache=cache)
    guided = model.sample(3, label, cond, torch.Generator().manual_seed(5), 0.8, cache=cache, guidance=1.0)
    assert torch.equal(guided, plain)


def test_guided_draws_follow_uncond_plus_scale_times_cond_minus_uncond():
    """With top-k 1 every guided draw is the argmax of the guided logits, which two separate full
    forwards (with the labels, with the null class) give for the grid drawn."""
    model, label, cond = GUIDED_CASES["label + cond + attention"]()
    scale = 2.5
    codes = sample_cached(model, 3, label, cond, torch.Generator().manual_seed(0), guidance=scale, top_k=1)
    with torch.no_grad():
        conditional = model.eval()(codes, label, cond)
        unconditional = model(codes, torch.full_like(label, model.config.null_label), cond)
    assert torch.equal(codes, (unconditional + scale * (conditional - unconditional)).argmax(dim=1))
    assert not torch.equal(codes, conditional.argmax(dim=1))  # the guidance changed the draws


def test_guidance_is_refused_without_a_null_class_and_pixel_controls_are_refused():
    model, label, cond = code_case()
    with pytest.raises(ValueError, match="trained with label dropout"):
        sample_cached(model, 3, label, cond, guidance=2.0)
    pixels, _, _ = pixel_case()
    for options in (dict(top_k=3), dict(top_p=0.5), dict(guidance=2.0)):
        with pytest.raises(ValueError, match="code mode only"):
            sample_cached(pixels, 1, **options)
    for options, message in ((dict(top_k=0), "top-k must be"), (dict(top_p=0.0), "top-p must"),
                             (dict(top_p=1.5), "top-p must"), (dict(guidance=float("nan")), "guidance must")):
        with pytest.raises(ValueError, match=message):
            sample_cached(model, 3, label, cond, **options)


def test_label_dropout_replaces_labels_by_the_null_class_in_training_only():
    config = PixelSNAILConfig(shape=(2, 2), n_codes=4, n_classes=3, label_dropout=0.3, **SMALL)
    model = PixelSNAIL(config)
    labels = torch.zeros(4000, dtype=torch.long)
    null_map = model.class_embed.weight[config.null_label]
    torch.manual_seed(0)
    dropped = (model.train().condition(4000, labels)[:, :, 0, 0] == null_map).all(dim=1).float().mean()
    assert 0.27 < dropped < 0.33
    assert not (model.eval().condition(4000, labels)[:, :, 0, 0] == null_map).all(dim=1).any()
    old = PixelSNAILConfig.from_json(config.to_json().replace('"label_dropout": 0.3, ', ""))
    assert old.label_dropout == 0.0 and old.null_label is None and PixelSNAIL(old).class_embed.num_embeddings == 3
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        PixelSNAILConfig(shape=(2, 2), n_codes=4, label_dropout=0.1)


def eager_and_static(**overrides):
    """A code_case model in eval mode, codes x (3, H, W) to feed it, and two cached networks of it
    for a batch of 3: eager (static=False) and static."""
    model, label, cond = code_case(**overrides)
    model.eval()
    x = torch.randint(0, model.config.n_codes, (3, *model.config.shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond_map = model.condition(3, label, cond)
    return model, x, (IncrementalPixelSNAIL(model, 3, cond_map), IncrementalPixelSNAIL(model, 3, cond_map, static=True))


def test_the_cached_step_compiles_without_a_graph_break_and_equals_the_eager_step():
    """The row start, the output and the feed-back each compile as one graph (fullgraph, static
    shapes) once for every position (a recompile fails), and give the eager step's outputs at every
    position of a model with attention, two streams and an output stack (the eager step's attention
    reads only the key slots written so far). Row 0 starts eagerly: it makes the buffers later rows
    write into."""
    model, x, (eager, network) = eager_and_static(streams="two", kernel_size=3, out_res_blocks=1, n_blocks=1)
    height, width = model.config.shape
    with torch.no_grad():
        start_row, output, feed = (torch.compile(work, fullgraph=True, dynamic=False)
                                   for work in (network.start_row, network.output, network.feed))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(height):
                for j in range(width):
                    network.at(i, j)
                    if j == 0:
                        (start_row if i else network.start_row)()
                    torch.testing.assert_close(output(), eager.output_at(i, j))
                    feed(x[..., i : i + 1, j : j + 1])
                    eager.write(i, j, x[..., i : i + 1, j : j + 1])


def test_the_eager_step_reading_the_written_key_slots_equals_the_static_step_over_all_slots():
    """The eager fast path (attention over the key slots written so far) against the static one
    (all N slots, the later ones masked: what is compiled and captured), at every position."""
    model, x, (fast, static) = eager_and_static(kernel_size=3, n_blocks=2)
    height, width = model.config.shape
    with torch.no_grad():
        for i in range(height):
            for j in range(width):
                torch.testing.assert_close(fast.output_at(i, j), static.output_at(i, j))
                for network in (fast, static):
                    network.write(i, j, x[..., i : i + 1, j : j + 1])
        # the eager step indexed by host ints, the static one by device tensors
        assert fast.raster_position() == height * width - 1 and isinstance(fast.raster_position(), int)
        assert isinstance(static.raster_position(), torch.Tensor)


def test_a_sample_directory_holds_the_images_as_arr_0_for_fid_evaluators(tmp_path):
    """fid_images.npz: one array arr_0, uint8 (N, S, S, 3), the images of samples.npz in index order."""
    import numpy as np

    from pipelines.store import samples

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    codes = np.zeros((5, 2, 2), np.int64)
    samples.start(tmp_path, {"seed": 0})
    samples.write_batch(tmp_path, [3, 4], [1, 1], images[3:], codes[3:], codes[3:])
    samples.write_batch(tmp_path, [0, 1, 2], [0, 0, 1], images[:3], codes[:3], codes[:3])
    samples.finish(tmp_path, 5)
    with np.load(tmp_path / "fid_images.npz", allow_pickle=False) as evaluator:
        assert evaluator.files == ["arr_0"]
        assert evaluator["arr_0"].dtype == np.uint8 and np.array_equal(evaluator["arr_0"], images)
    assert np.array_equal(samples.load(tmp_path / "samples.npz")["images"], images)


def test_batch_size_auto_plans_from_the_caches_per_sample_and_out_of_memory_is_one_line(monkeypatch):
    from pipelines.device import make_runtime
    from pipelines.infer import generation

    top, label, _ = code_case(conditioned=False)
    bottom, _, _ = code_case()
    pipeline = generation.Pipeline(None, top.eval(), bottom.eval(), 16)  # no VQ-VAE: only the priors plan
    runtime = make_runtime("cpu", "fp32")
    job = generation.SampleJob((0,), 1000, 0)
    per_level = generation.cache_bytes_per_sample(pipeline.by_level, runtime, job.drawing)
    with torch.no_grad():  # the caches grow linearly: 5 samples hold 4 more than 1
        sizes = [generation.tensor_bytes(IncrementalPixelSNAIL(top, n, None)) for n in (1, 5)]
    assert 0 < sizes[1] - sizes[0] <= 4 * per_level["top"]  # the rows' parts come on top
    monkeypatch.setattr(generation, "free_bytes", lambda device: 100 * max(per_level.values()))
    batch_size, plan = generation.plan_batch_size(pipeline.by_level, runtime, job)
    assert batch_size == 60 and plan.startswith("--batch-size auto: ") and "batch 60" in plan
    guided = generation.cache_bytes_per_sample(pipeline.by_level, runtime, Drawing(guidance=2.0))
    assert guided == {level: 2 * size for level, size in per_level.items()}

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(generation, "generate", out_of_memory)
    with pytest.raises(ValueError, match=r"^out of memory on cpu at --batch-size 60: try --batch-size 30 \("):
        generation.make_samples(pipeline, runtime, job, list(range(100)), 60, lambda *batch: None)
