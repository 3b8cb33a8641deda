"""Discretized logistic mixture likelihood of PixelCNN++ (Salimans et al., 2017) for RGB pixels.

Images live in [-1, 1]: the 8-bit value k maps to k / 127.5 - 1, so neighbouring values are 2/255
apart and value k owns the bin of half-width 1/255 around it, except that value 0 takes everything
below its upper edge and value 255 everything above its lower edge. A pixel's three values are
modelled jointly by a mixture of M components. Inside a component each channel is a logistic whose
mean depends linearly on the channels before it:

    mu_R = mean_R
    mu_G = mean_G + coeff_0 * x_R
    mu_B = mean_B + coeff_1 * x_R + coeff_2 * x_G

Parameter layout (B, 10*M, H, W), as the model produces it:
    params[:, :M]   mixture logits
    params[:, M:]   rearranged "b (c k m) h w -> b c k m h w" with c = colour channel (R, G, B)
                    and k = slot (mean, log_scale, coupling coefficient)
log_scales are clamped below at -7 and coefficients squashed by tanh. coeff_0, coeff_1, coeff_2
are simply the k=2 slots of c = 0, 1, 2: coeff_0 is stored in the R slot although it scales x_R
inside mu_G, and so on. The slot a coefficient lives in carries no meaning of its own.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

MIN_LOG_SCALE = -7.0
BIN_HALF_WIDTH = 1 / 255
# Below this probability a bin is scored by the density at its centre times the bin width
# (2/255 in x, i.e. 1/127.5) instead of the CDF difference, as in PixelCNN++.
MIN_CDF_DELTA = 1e-5
UNIFORM_EPS = 1e-5  # keeps the uniforms behind the Gumbel and logistic noise away from 0 and 1


def _split_params(params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B, 10*M, H, W) -> fp32 logits (B, M, H, W) and means, log_scales, coeffs (B, 3, M, H, W)."""
    n_components = params.shape[1] // 10
    assert params.shape[1] == 10 * n_components, f"expected 10*M channels, got {params.shape[1]}"
    params = params.float()
    logits = params[:, :n_components]
    channel_params = rearrange(params[:, n_components:], "b (c k m) h w -> b c k m h w", c=3, k=3)
    means, log_scales, coeffs = channel_params.unbind(dim=2)
    return logits, means, log_scales.clamp(min=MIN_LOG_SCALE), torch.tanh(coeffs)


def _coupled_means(means: Tensor, coeffs: Tensor, x: Tensor) -> Tensor:
    """Each channel's mean given the earlier channels of x (B, 3, H, W): (B, 3, M, H, W)."""
    x_r, x_g, _ = rearrange(x, "b c h w -> c b 1 h w")
    mu_r = means[:, 0]
    mu_g = means[:, 1] + coeffs[:, 0] * x_r
    mu_b = means[:, 2] + coeffs[:, 1] * x_r + coeffs[:, 2] * x_g
    return torch.stack([mu_r, mu_g, mu_b], dim=1)


def _channel_log_probs(x: Tensor, means: Tensor, log_scales: Tensor, coeffs: Tensor) -> Tensor:
    """log P(x_c | x_<c, m) for x (B, 3, H, W) in fp32: (B, 3, M, H, W)."""
    values = rearrange(x, "b c h w -> b c 1 h w")  # broadcasts over components
    return _bin_log_probs(values, values - _coupled_means(means, coeffs, x), log_scales)


def _bin_log_probs(values: Tensor, centered: Tensor, log_scales: Tensor) -> Tensor:
    """log P(value) of a logistic's bin: `values` on the 256-value grid, `centered` their distance
    from the logistic's mean; every argument broadcasts against the others.

    Every branch is computed everywhere and kept finite, so torch.where never routes NaN or inf
    into values or gradients.
    """
    inv_scale = torch.exp(-log_scales)
    half_bin_in = BIN_HALF_WIDTH * inv_scale  # half the bin width, standardised
    mid_in = inv_scale * centered  # standardised bin centre
    plus_in = mid_in + half_bin_in  # standardised upper bin edge
    min_in = mid_in - half_bin_in  # standardised lower bin edge

    log_cdf_plus = F.logsigmoid(plus_in)  # value 0: log P(X < upper edge)
    log_one_minus_cdf_min = F.logsigmoid(-min_in)  # value 255: log P(X > lower edge)
    # log(sigmoid(plus_in) - sigmoid(min_in)) via the identity
    # sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)). The plain difference
    # loses all fp32 precision in the upper tail, where both sigmoids round to ~1. The clamp only
    # bites when a == b in fp32 (enormous scales), a bin that is under MIN_CDF_DELTA anyway.
    width_factor = -torch.expm1(-2 * half_bin_in)
    log_cdf_delta = log_cdf_plus + log_one_minus_cdf_min + torch.log(width_factor.clamp(min=1e-12))
    log_pdf_mid = mid_in - log_scales - 2 * F.softplus(mid_in)
    interior = torch.where(
        log_cdf_delta > math.log(MIN_CDF_DELTA), log_cdf_delta, log_pdf_mid - math.log(127.5)
    )
    high_or_interior = torch.where(values > 0.999, log_one_minus_cdf_min, interior)
    return torch.where(values < -0.999, log_cdf_plus, high_or_interior)


def channel_log_probs(x: Tensor, params: Tensor) -> Tensor:
    """Per-channel, per-component log-probs log P(x_c | x_<c, m) in nats: (B, 3, M, H, W)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        _, means, log_scales, coeffs = _split_params(params)
        return _channel_log_probs(x.float(), means, log_scales, coeffs)


def log_prob(x: Tensor, params: Tensor) -> Tensor:
    """Joint log-probability in nats of each pixel's three values: (B, H, W).

    x is (B, 3, H, W) on the 256-value grid of [-1, 1]. Always computed in fp32 with autocast
    off: the bin probabilities are differences of nearly equal CDFs, which bf16 cannot resolve.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits, means, log_scales, coeffs = _split_params(params)
        log_channels = _channel_log_probs(x.float(), means, log_scales, coeffs)  # (B, 3, M, H, W)
        log_joint = F.log_softmax(logits, dim=1) + log_channels.sum(dim=1)  # (B, M, H, W)
        return torch.logsumexp(log_joint, dim=1)


class PixelFactors:
    """The likelihood of one pixel factor by factor, in its own order: R, then G given R, then B given
    R and G. For each channel in turn, `distribution(x)` gives its 256 values' probabilities given
    the earlier channels of x, then `observe(values)` takes the channel's values and moves on.

    Given the earlier channels the components are weighed by their posterior: P(x_c | x_<c) =
    sum_m P(m | x_<c) P(x_c | x_<c, m), where P(m | x_<c) grows from the mixture weights by each
    observed channel's likelihood under m. The three factors at a pixel's own values multiply to
    exp(log_prob) of that pixel (up to the normalisation of each).

    params (B, 10*M) at one position; x (B, 3) in [-1, 1], of which only the channels before the
    current one are read.
    """

    def __init__(self, params: Tensor):
        with torch.autocast(device_type=params.device.type, enabled=False):
            # logits (B, M, 1, 1); means, log_scales, coeffs (B, 3, M, 1, 1)
            logits, self.means, self.log_scales, self.coeffs = _split_params(rearrange(params, "b p -> b p 1 1"))
            self.log_weights = F.log_softmax(logits, dim=1)  # log P(m | the channels observed) + a constant
        self.values = (torch.arange(256, device=params.device) / 127.5 - 1).view(1, 1, 1, 256)  # the data's grid
        self.channel, self.log_bins = 0, None

    def distribution(self, x: Tensor) -> Tensor:
        """(B, 256) probabilities of the current channel's values in fp32, normalised (the bins fall
        short of 1 by the mid-point rule)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            known = rearrange(x.float(), "b c -> b c 1 1")
            centered = self.values - _coupled_means(self.means, self.coeffs, known)[:, self.channel]  # (B, M, 1, 256)
            self.log_bins = _bin_log_probs(self.values, centered, self.log_scales[:, self.channel])
            return torch.softmax(torch.logsumexp(self.log_weights + self.log_bins, dim=1)[:, 0], dim=-1)

    def observe(self, values: Tensor):
        """The current channel's values, (B,) integers 0..255: the next channel is given them."""
        index = repeat(values, "b -> b m 1 1", m=self.log_bins.shape[1])
        self.log_weights = self.log_weights + self.log_bins.gather(3, index)
        self.channel += 1


def nll_bits_per_dim(x: Tensor, params: Tensor) -> Tensor:
    """Per-example negative log-likelihood in bits per sub-pixel: (B,)."""
    _, n_channels, height, width = x.shape
    return -log_prob(x, params).sum(dim=(1, 2)) / (n_channels * height * width * math.log(2))


def _uniform(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U(0, 1) noise of the given shape, fp32, on like's device."""
    return torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)


def _quantise(x: Tensor) -> Tensor:
    """Clamp to [-1, 1] and snap to the nearest of the 256 values k / 127.5 - 1."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def sample(params: Tensor, noise: Tensor | torch.Generator | None = None) -> Tensor:
    """Draw each pixel from the mixture: (B, 3, H, W) exactly on the 256-value grid of [-1, 1].

    Each channel is quantised before it enters the coupling of the next one. log_prob scores
    G given the discrete value of R (the data), and rounding a clamped logistic draw lands on
    value k with probability CDF(k + 1/255) - CDF(k - 1/255), the end values taking the tails.
    So drawing R, rounding it, then drawing G around mean_G + coeff_0 * round(R) is an exact
    draw from the distribution log_prob scores (up to its sub-1e-5 mid-point approximation);
    coupling with the unrounded R would sample a slightly blurred version of it.

    All randomness comes from `noise`: a torch.Generator (or None), from which one draw of full,
    fixed shape (B, M + 3, H, W) is taken, so a seed fixes the result and the generator advances
    identically for any params of the same shape; or those uniforms themselves, in (0, 1) (the
    per-sample keys of prior.noise). Per pixel, M of them pick the component (Gumbel-max) and 3
    give the channels' logistic noise.
    """
    with torch.autocast(device_type=params.device.type, enabled=False):
        logits, means, log_scales, coeffs = _split_params(params)
        batch, n_components, height, width = logits.shape
        if not isinstance(noise, Tensor):
            noise = _uniform((batch, n_components + 3, height, width), logits, noise)
        noise = UNIFORM_EPS + (1 - 2 * UNIFORM_EPS) * noise
        component_noise, channel_noise = noise.split([n_components, 3], dim=1)

        gumbel = -torch.log(-torch.log(component_noise))
        component = (logits + gumbel).argmax(dim=1)  # (B, H, W), Gumbel-max: ~ softmax(logits)
        index = repeat(component, "b h w -> b c 1 h w", c=3)
        picked = (t.gather(2, index) for t in (means, log_scales, coeffs))
        means, log_scales, coeffs = (rearrange(t, "b c 1 h w -> b c h w") for t in picked)
        logistic = torch.log(channel_noise) - torch.log1p(-channel_noise)  # standard logistic
        offsets = torch.exp(log_scales) * logistic  # (B, 3, H, W)

        x_r = _quantise(means[:, 0] + offsets[:, 0])
        x_g = _quantise(means[:, 1] + coeffs[:, 0] * x_r + offsets[:, 1])
        x_b = _quantise(means[:, 2] + coeffs[:, 1] * x_r + coeffs[:, 2] * x_g + offsets[:, 2])
        return torch.stack([x_r, x_g, x_b], dim=1)
