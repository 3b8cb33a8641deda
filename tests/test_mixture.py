"""Tests for prior.mixture: the discretized logistic mixture likelihood and its sampler."""

import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from prior.mixture import channel_log_probs, log_prob, nll_bits_per_dim, sample

GRID = torch.arange(256, dtype=torch.float32) / 127.5 - 1  # the 256 values of one channel


def pack_params(logits, means, log_scales, coeffs):
    """logits (B, M, H, W) and raw means, log_scales, coeffs (B, 3, M, H, W) -> (B, 10*M, H, W)."""
    channel_params = torch.stack([means, log_scales, coeffs], dim=2)  # (B, 3, 3, M, H, W)
    return torch.cat([logits, rearrange(channel_params, "b c k m h w -> b (c k m) h w")], dim=1)


def random_params(batch, n_components, height, width, seed):
    """Wide-ranging params: log_scales from below the -7 clamp up to 3, means often beyond +-1."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, n_components, height, width)
    logits = 2 * torch.randn(batch, n_components, height, width, generator=g)
    means = 2 * torch.randn(shape, generator=g)
    log_scales = torch.empty(shape).uniform_(-9, 3, generator=g)
    coeffs = 2 * torch.randn(shape, generator=g)
    return pack_params(logits, means, log_scales, coeffs)


def random_images(batch, height, width, seed):
    """Images on the grid where about a sixth of the values are 0 and another sixth are 255."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-60, 316, (batch, 3, height, width), generator=g).clamp(0, 255)
    return GRID[k]


def to_index(x):
    """Grid values -> 8-bit integers."""
    return torch.round((x + 1) * 127.5).long()


# ----------------------------------------------------------------------------------------------
# Slow, scalar reference, written straight from the PixelCNN++ definition in float64.


def softplus(z):
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def sigmoid(z):
    return math.exp(-softplus(-z))


def reference_channel_log_prob(x, mu, log_scale):
    """(log P(x) of one channel under one logistic, branch name, cdf_delta or None)."""
    log_scale = max(log_scale, -7.0)
    inv_scale = math.exp(-log_scale)
    plus_in = inv_scale * (x - mu + 1 / 255)
    min_in = inv_scale * (x - mu - 1 / 255)
    if x < -0.999:
        return -softplus(-plus_in), "low edge", None
    if x > 0.999:
        return -softplus(min_in), "high edge", None
    cdf_delta = sigmoid(plus_in) - sigmoid(min_in)
    if cdf_delta > 1e-5:
        return math.log(cdf_delta), "cdf delta", cdf_delta
    mid_in = inv_scale * (x - mu)
    return mid_in - log_scale - 2 * softplus(mid_in) - math.log(127.5), "mid point", cdf_delta


def reference_log_probs(x, params):
    """Loops over pixels, components and channels.

    Returns per-channel log-probs (B, 3, M, H, W), joint log-probs (B, H, W), the set of
    branches taken, and a (B, H, W) mask of pixels where some cdf_delta sits so close to the
    1e-5 switch that fp32 and float64 may legitimately pick different branches.
    """
    batch, n_params, height, width = params.shape
    n_components = n_params // 10
    x, params = x.double().tolist(), params.double().tolist()
    channel_out = torch.zeros(batch, 3, n_components, height, width, dtype=torch.float64)
    joint_out = torch.zeros(batch, height, width, dtype=torch.float64)
    borderline = torch.zeros(batch, height, width, dtype=torch.bool)
    branches = set()

    def param(b, c, k, m, h, w):  # layout "(c k m)" after the M logits
        return params[b][n_components + (c * 3 + k) * n_components + m][h][w]

    for b in range(batch):
        for h in range(height):
            for w in range(width):
                logits = [params[b][m][h][w] for m in range(n_components)]
                top = max(logits)
                log_norm = top + math.log(sum(math.exp(l - top) for l in logits))
                x_r, x_g, x_b = (x[b][c][h][w] for c in range(3))
                terms = []
                for m in range(n_components):
                    coeff = [math.tanh(param(b, c, 2, m, h, w)) for c in range(3)]
                    mu = [
                        param(b, 0, 0, m, h, w),
                        param(b, 1, 0, m, h, w) + coeff[0] * x_r,
                        param(b, 2, 0, m, h, w) + coeff[1] * x_r + coeff[2] * x_g,
                    ]
                    term = logits[m] - log_norm
                    for c, value in enumerate((x_r, x_g, x_b)):
                        log_scale = param(b, c, 1, m, h, w)
                        lp, branch, cdf_delta = reference_channel_log_prob(value, mu[c], log_scale)
                        channel_out[b, c, m, h, w] = lp
                        branches.add(branch)
                        if cdf_delta is not None and abs(cdf_delta / 1e-5 - 1) < 1e-3:
                            borderline[b, h, w] = True
                        term += lp
                    terms.append(term)
                top = max(terms)
                joint_out[b, h, w] = top + math.log(sum(math.exp(t - top) for t in terms))
    return channel_out, joint_out, branches, borderline


def test_matches_scalar_reference():
    params = random_params(4, 4, 4, 4, seed=0)
    x = random_images(4, 4, 4, seed=1)
    ref_channels, ref_joint, branches, borderline = reference_log_probs(x, params)
    assert branches == {"low edge", "high edge", "cdf delta", "mid point"}

    keep = ~borderline
    channels = channel_log_probs(x, params)
    keep_channels = repeat(keep, "b h w -> b c m h w", c=3, m=4)
    # Relative tolerance too: far-tail log-probs reach about -1e3, beyond fp32's 1e-4 resolution.
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-4)
    close(channels[keep_channels].double(), ref_channels[keep_channels])
    close(log_prob(x, params)[keep].double(), ref_joint[keep])


def test_nll_bits_per_dim():
    params = random_params(3, 2, 4, 5, seed=2)
    x = random_images(3, 4, 5, seed=3)
    expected = -log_prob(x, params).sum(dim=(1, 2)) / (3 * 4 * 5 * math.log(2))
    bpd = nll_bits_per_dim(x, params)
    assert bpd.shape == (3,)
    torch.testing.assert_close(bpd, expected)


# ----------------------------------------------------------------------------------------------
# Normalisation, and sampling against the enumerated joint.


def coupled_pixel():
    """One hand-built pixel with M = 3, whose full 256^3 joint the tests below enumerate.

    In the first two components R is broad and G narrow, coupled to R with coefficient ~ +-1 and
    a mean offset on the grid, so G given R peaks on one value; it would not if the sampler
    coupled G to R before rounding R. The third component puts mass on both edge values, has a
    G scale below the clamp and a very wide B.
    """
    logits = torch.tensor([1.0, 0.0, -0.5])
    means = torch.tensor([[-0.2, 0.1, 1.3], [8 / 127.5, 0.0, -1.2], [0.0, 0.4, 0.5]])  # (c, m)
    log_scales = torch.tensor([[-3.5, -3.0, 0.0], [-7.0, -7.0, -9.0], [-4.0, -3.0, 2.0]])
    coeffs = torch.tensor([[10.0, -10.0, 2.0], [0.5, -1.0, 1.0], [1.0, 0.3, -2.0]])
    as_pixel = (rearrange(t, "... -> 1 ... 1 1") for t in (logits, means, log_scales, coeffs))
    return pack_params(*as_pixel)[0, :, 0, 0]


@functools.cache
def coupled_joint():
    """P(R, G, B) of coupled_pixel() over all 256^3 values, via log_prob: (256, 256, 256) float64.

    One such enumeration costs several CPU-seconds, hence a single pixel; the per-channel test
    below covers many random ones.
    """
    probs = []
    for r in GRID.split(8):
        rgb = torch.broadcast_tensors(r[:, None, None], GRID[None, :, None], GRID[None, None, :])
        x = torch.stack(rgb, dim=1)  # (chunk, 3, 256, 256): every (G, B) for each R in the chunk
        params = repeat(coupled_pixel(), "p -> r p g b", r=len(r), g=256, b=256)
        probs.append(log_prob(x, params).double().exp())  # (chunk of R, G, B)
    return torch.cat(probs)


def test_joint_sums_to_one():
    joint = coupled_joint()
    assert abs(joint.sum().item() - 1) < 1e-4
    assert joint[0].sum() > 0.01 and joint[255].sum() > 0.01  # both edges carry mass


def test_channel_marginals_sum_to_one():
    """For fixed earlier channels, each component's distribution of a channel sums to 1."""
    n_pixels, n_components = 64, 3
    params = random_params(n_pixels, n_components, 1, 1, seed=5)
    params = repeat(params, "b p 1 1 -> b p 1 w", w=256)
    for c in range(3):
        x = repeat(random_images(n_pixels, 1, 1, seed=6 + c), "b c 1 1 -> b c 1 w", w=256).clone()
        x[:, c] = GRID
        totals = channel_log_probs(x, params)[:, c].exp().sum(dim=-1)  # (B, M, 1)
        torch.testing.assert_close(totals, torch.ones_like(totals), rtol=0, atol=1e-4)


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


def test_sample_histogram_matches_log_prob():
    n_samples = 2**17
    params = repeat(coupled_pixel(), "p -> b p 1 1", b=n_samples)
    k = to_index(sample(params, torch.Generator().manual_seed(7)))[:, :, 0, 0]  # (N, 3)
    joint = coupled_joint()

    p_r = joint.sum(dim=(1, 2))
    empirical_r = torch.bincount(k[:, 0], minlength=256).double() / n_samples
    assert total_variation(empirical_r, p_r) < 0.03  # ~0.01 expected from 2^17 draws

    # (R, G) jointly, i.e. G given R weighted by P(R): ~0.015 here from sampling noise, but ~0.12
    # for a sampler that couples G to R before rounding R.
    p_rg = joint.sum(dim=2)
    empirical_rg = torch.bincount(k[:, 0] * 256 + k[:, 1], minlength=256**2).double() / n_samples
    assert total_variation(empirical_rg, p_rg.flatten()) < 0.05


# ----------------------------------------------------------------------------------------------
# Sampler properties.


def test_sample_on_grid_and_reproducible():
    params = random_params(2, 5, 6, 7, seed=8)
    x = sample(params, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 6, 7) and x.dtype == torch.float32
    k = to_index(x)
    assert k.min() >= 0 and k.max() <= 255
    assert torch.equal(x, GRID[k])
    assert torch.equal(x, sample(params, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, sample(params, torch.Generator().manual_seed(1)))


def test_sample_consumes_generator_by_shape_only():
    states = []
    for seed in (9, 10):
        generator = torch.Generator().manual_seed(0)
        sample(random_params(2, 3, 4, 5, seed=seed), generator)
        states.append(generator.get_state())
    assert torch.equal(*states)


def test_peaked_sample_equals_rounded_coupled_means():
    """One dominant component per pixel, scale at the floor, targets on the grid.

    The logistic noise is not negligible even at log_scale -7: a channel lands one value off its
    target with probability 2 * sigmoid(-(1/255) / exp(-7)) ~ 3%, so we ask for most pixels to
    hit all three targets exactly and for the rest to be within a few values (an R or G miss
    shifts the later coupled means by up to one value each).
    """
    batch, n_components, height, width = 2, 4, 16, 16
    g = torch.Generator().manual_seed(11)
    shape = (batch, 3, n_components, height, width)
    target = GRID[torch.randint(0, 256, (batch, 3, height, width), generator=g)]
    dominant = torch.randint(0, n_components, (batch, height, width), generator=g)
    logits = 30.0 * rearrange(F.one_hot(dominant, n_components), "b h w m -> b m h w").float()
    coeffs = 2 * torch.randn(shape, generator=g)
    c0, c1, c2 = torch.tanh(coeffs).unbind(dim=1)  # (B, M, H, W)
    t_r, t_g, t_b = rearrange(target, "b c h w -> c b 1 h w")
    # Means placing each coupled mean exactly on its target once earlier channels hit theirs.
    means = torch.stack([t_r.expand_as(c0), t_g - c0 * t_r, t_b - c1 * t_r - c2 * t_g], dim=1)
    log_scales = torch.full(shape, -10.0)  # clamped to -7
    x = sample(pack_params(logits, means, log_scales, coeffs), torch.Generator().manual_seed(12))

    off_by = (to_index(x) - to_index(target)).abs()
    assert (off_by.amax(dim=1) == 0).float().mean() > 0.85
    assert off_by.max() <= 4


# ----------------------------------------------------------------------------------------------
# Numerics.


def extreme_params_and_images():
    """Every combination of extreme raw params, scored at values 0, 1, 128, 254, 255."""
    log_scales = torch.tensor([-20.0, -7.0, 0.0, 5.0, 100.0])
    means = torch.tensor([-50.0, -1.0, 0.0, 0.004, 1.0, 50.0])
    coeffs = torch.tensor([-30.0, 0.0, 30.0])
    values = GRID[torch.tensor([0, 1, 128, 254, 255])]
    grid = torch.cartesian_prod(log_scales, means, coeffs, values)  # (N, 4), one pixel per row
    log_scale, mean, coeff, value = grid.T
    log_scale, coeff = (repeat(t, "n -> 1 c m n 1", c=3, m=2) for t in (log_scale, coeff))
    means = torch.stack([mean, -mean], dim=1)  # second component on the other side
    means = repeat(means, "n m -> 1 c m n 1", c=3)
    logits = repeat(torch.tensor([1e3, -1e3]), "m -> 1 m n 1", n=len(grid))
    x = repeat(value, "n -> 1 c n 1", c=3)
    return pack_params(logits, means, log_scale, coeff), x


def test_finite_values_and_gradients_at_extremes():
    params, x = extreme_params_and_images()
    params.requires_grad_(True)
    lp = log_prob(x, params)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(params.grad).all()

    channels = channel_log_probs(x, params)
    assert torch.isfinite(channels).all() and (channels <= 1e-6).all()
    assert torch.isfinite(sample(params.detach(), torch.Generator().manual_seed(0))).all()


def test_safe_under_bf16_autocast():
    params = random_params(2, 3, 4, 4, seed=13).bfloat16()
    x = random_images(2, 4, 4, seed=14)
    expected = log_prob(x, params.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = log_prob(x, params)
        bpd = nll_bits_per_dim(x, params)
        samples = sample(params, torch.Generator().manual_seed(0))
    assert lp.dtype == bpd.dtype == samples.dtype == torch.float32
    torch.testing.assert_close(lp, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(bpd, nll_bits_per_dim(x, params.float()), rtol=0, atol=1e-5)
    assert torch.equal(samples, sample(params.float(), torch.Generator().manual_seed(0)))
