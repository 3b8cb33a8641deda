"""How a code prior's values are drawn from its logits: temperature, top-k, top-p, guidance.

- temperature T divides the logits;
- top-k keeps the k largest logits (after temperature), top-p (nucleus, Holtzman et al. 2019)
  the smallest set of most likely codes whose probability reaches p; the rest get probability 0;
- classifier-free guidance (Ho & Salimans 2022) with scale s draws from the logits
  `uncond + s * (cond - uncond)`, where `uncond` is the prior's output for its learned null class
  (a prior trained with label dropout). s = 1 is plain conditional sampling, s = 0 unconditional.

The pixel mixture has no such controls: its sampler draws a mixture component, then a logistic
value per channel, and truncating either would move the distribution off the model's discretized
logistic in a way that has no established meaning; the samplers refuse them in pixel mode.

The scripts take these controls as options of the same names (--temperature, --top-k, --top-p,
--guidance: each field's metadata carries its help) and pass them here unchanged, so a refusal
names the option.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

FP32_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Drawing:
    """The sampling controls of one call: all off by default (plain sampling at temperature 1)."""

    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the priors (default %(default)s)"})
    top_k: int | None = field(default=None, metadata={"help": "draw each code among the k most likely only"})
    top_p: float | None = field(default=None, metadata={
        "help": "nucleus sampling: draw each code among the smallest set of most likely codes whose probability "
        "reaches p (after temperature, like --top-k)"})
    guidance: float | None = field(default=None, metadata={  # None (or 1): no unconditional pass
        "help": "classifier-free guidance scale s: draw from uncond + s * (cond - uncond) logits (1: plain "
        "conditional sampling, 0: unconditional); needs priors trained with --label-dropout"})

    def __post_init__(self):
        if not 0 < self.temperature < math.inf:  # nan fails this too
            raise ValueError(f"--temperature must be > 0 and finite, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.guidance is not None and not -math.inf < self.guidance < math.inf:
            raise ValueError(f"--guidance must be finite, got {self.guidance}")

    @property
    def guided(self):
        """Whether draws need the unconditional pass: guidance 1 is the conditional logits themselves."""
        return self.guidance is not None and self.guidance != 1

    def check(self, config):
        """Refuses controls the model cannot take, with one line naming the option."""
        if config.pixel_mode and (self.temperature != 1.0 or self.top_k or self.top_p or self.guidance is not None):
            raise ValueError("temperature, top-k, top-p and guidance apply to code mode only (the pixel mixture has none)")
        if self.guidance is not None and config.null_label is None:
            raise ValueError("guidance needs a prior trained with label dropout (--label-dropout): this one has no null class")


def guide(out: Tensor, scale: float) -> Tensor:
    """(2B, K, ...) outputs, the conditional batch then the unconditional one -> (B, K, ...) guided
    logits `uncond + scale * (cond - uncond)`, in fp32."""
    cond, uncond = out.float().chunk(2)
    return uncond + scale * (cond - uncond)


def truncate(logits: Tensor, top_k=None, top_p=None, temperature=1.0) -> Tensor:
    """(B, K) logits -> the same with every code outside the top k and outside the nucleus of
    mass top_p of softmax(logits / temperature) at -inf. The most likely code always stays; codes
    tied with the k-th stay too. Stable at any positive temperature: the nucleus is computed from
    the logits less their maximum (<= 0), so a tiny temperature sends them to -inf, never to NaN."""
    if top_k is not None and top_k < logits.shape[1]:
        kth = torch.topk(logits, top_k, dim=1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:
        scaled = (logits - logits.amax(dim=1, keepdim=True)) / effective(temperature)  # (B, K), <= 0
        sorted_logits, order = scaled.sort(dim=1, descending=True)
        probs = torch.softmax(sorted_logits, dim=1)
        mass_before = probs.cumsum(dim=1) - probs  # of the codes more likely than this one
        drop_sorted = mass_before >= top_p  # the set is complete before this code
        drop = drop_sorted.scatter(1, order, drop_sorted)  # back to code order
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def effective(temperature: float) -> float:
    """The temperature the fp32 arithmetic uses: below fp32's smallest normal number (1.2e-38) the
    argmax is drawn anyway (any two distinct fp32 logits differ by more than that temperature times
    the largest noise), so smaller ones are raised to it rather than rounded to 0 (a division by 0)."""
    return max(temperature, FP32_TINY)


def draw_codes(logits: Tensor, uniforms: Tensor, drawing: Drawing) -> Tensor:
    """(B, K) logits and (B, K) uniforms in (0, 1) -> (B,) codes drawn from
    softmax(truncate(logits / T)), by Gumbel-max: argmax(logits / T + g), g = -log(-log(u)).

    The same argmax is computed as logits + T * g for T <= 1 and logits / T + g above it, so
    neither side overflows at any finite positive T: at a tiny T the noise vanishes and the argmax
    is the greedy draw, at a huge T the logits do and the draw is uniform."""
    logits = truncate(logits.float(), drawing.top_k, drawing.top_p, drawing.temperature)
    gumbel = -torch.log(-torch.log(uniforms))  # (B, K), |g| < 17 for 23-bit uniforms
    temperature = effective(drawing.temperature)
    scores = logits + temperature * gumbel if temperature <= 1 else logits / temperature + gumbel
    return scores.argmax(dim=1)
