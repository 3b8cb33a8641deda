"""PixelSNAIL (Chen, Mishra, Rohaninejad, Abbeel 2017), one model for two kinds of input.

- Pixel mode (`n_codes=None`): x is (B, 3, H, W) in [-1, 1]; the output is a discretized
  logistic mixture with linear autoregressive channel coupling (PixelCNN++), (B, 10*M, H, W).
- Code mode (`n_codes=K`): x is (B, H, W) integer codes; the output is (B, K, H, W) logits.

Both modes share the same blocks: `n_blocks` times [`n_res_blocks` causal gated resnets, then
an attention block], then `out_res_blocks` 1x1 gated resnets before the head. Optional
conditions: a class label and a code grid of another level (the VQ-VAE-2 bottom prior takes the
top codes), both turned into one conditioning map that every gated resnet adds in.

Causality. Every conv after the input layer reads up and to the left only (down-right shifted),
so without attention a position would never see the positions up and to its right beyond the
kernel: a blind spot. The official model covers it with attention. A model without attention
(the VQ-VAE-2 bottom prior) gets PixelCNN++'s second stream instead (`streams="two"`): a
vertical stream of down-shifted convs that read every column of the rows above within their
kernel, fed into the down-right stream as the auxiliary input of every causal gated resnet.

Example, the paper's CIFAR-10 model:
    >>> config = PixelSNAILConfig(shape=(32, 32))
    >>> model = PixelSNAIL(config)
    >>> params = model(torch.rand(8, 3, 32, 32) * 2 - 1)   # (8, 100, 32, 32)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from modelkit import JSONConfig, check_range
from prior import mixture, sampling
from prior.drawing import Drawing, draw_codes
from prior.layers import (AttentionBlock, CausalInput, GatedResBlock, VerticalInput, init_from_data, nin,
                          positional_background)
from prior.modes import evaluating
from prior.noise import uniforms

STREAMS = ("auto", "one", "two")


@dataclass
class PixelSNAILConfig(JSONConfig):
    FILE_DEFAULTS = {"streams": "one"}  # checkpoints from before the field: one stream
    shape: tuple[int, int] = (32, 32)  # (H, W) of the modelled grid
    n_codes: int | None = None  # None: RGB pixels with the mixture head; K: codes with a softmax
    n_classes: int = 0  # > 0: condition on a class label
    # > 0: training replaces a label by a learned null class (label n_classes) with this probability,
    # which classifier-free guidance then needs
    label_dropout: float = 0.0
    cond_codes: int | None = None  # codebook size of the conditioning code grid
    cond_shape: tuple[int, int] | None = None  # (H, W) of the conditioning code grid
    channels: int = 256
    n_blocks: int = 12
    n_res_blocks: int = 4
    res_channels: int | None = None  # R: causal gated resnets are k x k to R, then 1x1 (see GatedResBlock)
    attention: bool = True
    # "two": a vertical stream besides the down-right one (no blind spot without attention);
    # "auto": two streams exactly when attention is off
    streams: str = "auto"
    dropout: float = 0.5
    # training drops each attention weight with this probability (VQ-VAE-2's priors); 0, the
    # default, is the model of checkpoints written before the field existed
    attention_dropout: float = 0.0
    n_mixtures: int = 10  # pixel mode only
    kernel_size: int = 2  # causal convolutions are kernel_size x kernel_size
    key_channels: int = 16
    value_channels: int = 128
    n_heads: int = 1
    embed_channels: int = 64  # code mode: width of the input code embedding
    cond_channels: int = 128  # width of the conditioning map
    cond_res_blocks: int = 4  # non-causal gated resnets over the conditioning code grid
    out_res_blocks: int = 0  # 1x1 gated resnets between the last block and the head

    def __post_init__(self):
        self.shape = tuple(self.shape)
        if self.cond_shape is not None:
            self.cond_shape = tuple(self.cond_shape)
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"shape must be (H, W) with H, W >= 1, got {self.shape}")
        if self.n_codes is not None and self.n_codes < 2:
            raise ValueError(f"n_codes must be None (pixels) or >= 2, got {self.n_codes}")
        if self.n_classes < 0:
            raise ValueError(f"n_classes must be >= 0, got {self.n_classes}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.label_dropout and not self.n_classes:
            raise ValueError("label_dropout needs a class-conditional model (n_classes > 0)")
        if (self.cond_codes is None) != (self.cond_shape is None):
            raise ValueError("cond_codes and cond_shape go together: give both or neither")
        if self.cond_codes is not None and self.cond_codes < 2:
            raise ValueError(f"cond_codes must be >= 2, got {self.cond_codes}")
        for name in ("channels", "n_blocks", "n_res_blocks", "n_mixtures", "kernel_size", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.res_channels is not None and self.res_channels < 1:
            raise ValueError(f"res_channels must be None or >= 1, got {self.res_channels}")
        for name in ("cond_res_blocks", "out_res_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.streams not in STREAMS:
            raise ValueError(f"streams must be one of {', '.join(STREAMS)}, got {self.streams!r}")
        if self.kernel_size < 2:
            raise ValueError(f"kernel_size must be >= 2 (causal convs), got {self.kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.attention_dropout and not self.attention:
            raise ValueError("attention_dropout needs attention (attention=True)")
        if self.key_channels % self.n_heads or self.value_channels % self.n_heads:
            raise ValueError(
                f"key_channels ({self.key_channels}) and value_channels ({self.value_channels}) "
                f"must be divisible by n_heads ({self.n_heads})"
            )

    @property
    def pixel_mode(self):
        return self.n_codes is None

    @property
    def two_streams(self):
        return self.streams == "two" or (self.streams == "auto" and not self.attention)

    @property
    def null_label(self):
        """The label of the learned null class (no class), or None when training had no label dropout."""
        return self.n_classes if self.label_dropout else None

    @property
    def out_channels(self):
        return 10 * self.n_mixtures if self.pixel_mode else self.n_codes

    @property
    def conditioned(self):
        return self.n_classes > 0 or self.cond_codes is not None


class ConditionStack(nn.Module):
    """Embeds the code grid of another level, refines it with non-causal gated resnets, and
    resizes it (nearest) to the modelled grid."""

    def __init__(self, n_codes, channels, n_res_blocks, shape, dropout):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(n_codes, channels)
        self.blocks = nn.ModuleList(
            GatedResBlock(channels, 3, mode="same", dropout=dropout) for _ in range(n_res_blocks)
        )

    def forward(self, codes):
        h = rearrange(self.embed(codes), "b h w c -> b c h w")
        for block in self.blocks:
            h = block(h)
        return F.interpolate(h, size=self.shape, mode="nearest")


class PixelSNAILBlock(nn.Module):
    """n_res_blocks causal gated resnets, then (optionally) the attention block. In a two-stream
    model each gated resnet has a vertical twin that runs first and feeds it as its aux input."""

    def __init__(self, config, input_channels, cond_channels):
        super().__init__()
        c = config

        def res_blocks(mode, aux_channels):
            return nn.ModuleList(
                GatedResBlock(c.channels, c.kernel_size, mode, c.res_channels, aux_channels, cond_channels, c.dropout)
                for _ in range(c.n_res_blocks)
            )

        self.vertical = res_blocks("down", 0) if c.two_streams else None
        self.res_blocks = res_blocks("causal", c.channels if c.two_streams else 0)
        self.attention = None
        if c.attention:
            self.attention = AttentionBlock(
                c.channels, input_channels, c.key_channels, c.value_channels, c.n_heads, cond_channels, c.dropout,
                c.attention_dropout,
            )

    def forward(self, h, vertical, raw, background, cond):
        """(h, vertical) -> (h, vertical): the down-right and the vertical stream (None with one)."""
        for index, block in enumerate(self.res_blocks):
            if self.vertical is not None:
                vertical = self.vertical[index](vertical, cond=cond)
            h = block(h, aux=vertical, cond=cond)
        if self.attention is not None:
            h = self.attention(h, raw, background, cond)
        return h, vertical


class PixelSNAIL(nn.Module):
    def __init__(self, config: PixelSNAILConfig):
        super().__init__()
        c = self.config = config
        input_channels = 3 if c.pixel_mode else c.embed_channels
        self.embed = None if c.pixel_mode else nn.Embedding(c.n_codes, c.embed_channels)
        # one more input channel of ones: lets the first layer tell padding from a zero input
        self.input = CausalInput(input_channels + 1, c.channels, c.kernel_size)
        self.vertical_input = VerticalInput(input_channels + 1, c.channels, c.kernel_size) if c.two_streams else None
        self.register_buffer("background", positional_background(*c.shape), persistent=False)
        cond_channels = c.cond_channels if c.conditioned else 0
        n_labels = c.n_classes + (c.null_label is not None)
        self.class_embed = nn.Embedding(n_labels, cond_channels) if c.n_classes else None
        self.cond_stack = None
        if c.cond_codes is not None:
            self.cond_stack = ConditionStack(c.cond_codes, cond_channels, c.cond_res_blocks, c.shape, c.dropout)
        self.blocks = nn.ModuleList(PixelSNAILBlock(c, input_channels, cond_channels) for _ in range(c.n_blocks))
        self.out_blocks = nn.ModuleList(
            GatedResBlock(c.channels, 1, res_channels=c.res_channels, cond_channels=cond_channels, dropout=c.dropout)
            for _ in range(c.out_res_blocks)
        )
        self.head = nin(c.channels, c.out_channels)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    # -- inputs -----------------------------------------------------------------------------

    def check_input(self, x):
        c = self.config
        if c.pixel_mode:
            expected = (3, *c.shape)
            if x.dim() != 4 or tuple(x.shape[1:]) != expected or not x.is_floating_point():
                raise ValueError(f"pixel mode expects float x of shape (B, {expected}), got {x.dtype} {tuple(x.shape)}")
        else:
            if x.dim() != 3 or tuple(x.shape[1:]) != c.shape or x.is_floating_point():
                raise ValueError(f"code mode expects integer x of shape (B, {c.shape}), got {x.dtype} {tuple(x.shape)}")
            check_range("codes", x, c.n_codes)

    def raw_input(self, x):
        """(B, C_in, H, W): pixels as they are, or codes through the input embedding."""
        if self.config.pixel_mode:
            return x
        return rearrange(self.embed(x), "b h w c -> b c h w")

    def condition(self, batch_size, label=None, cond=None):
        """The conditioning map every gated resnet adds in: (B, D, H, W), (B, D, 1, 1) or None.
        A label may be the null class (`config.null_label`) when the model has one; in training
        mode, label dropout replaces labels by it."""
        c = self.config
        if (label is None) != (c.n_classes == 0):
            raise ValueError(f"label must be given exactly when n_classes > 0 (n_classes={c.n_classes})")
        if (cond is None) != (c.cond_codes is None):
            raise ValueError(f"cond must be given exactly when cond_codes is set (cond_codes={c.cond_codes})")
        cond_map = None
        if cond is not None:
            if tuple(cond.shape) != (batch_size, *c.cond_shape) or cond.is_floating_point():
                raise ValueError(f"cond must be integer codes of shape ({batch_size}, {c.cond_shape}), got {tuple(cond.shape)}")
            check_range("cond codes", cond, c.cond_codes)
            cond_map = self.cond_stack(cond)
        if label is not None:
            if tuple(label.shape) != (batch_size,):
                raise ValueError(f"label must have shape ({batch_size},), got {tuple(label.shape)}")
            check_range("label", label, c.n_classes + (c.null_label is not None))
            if self.training and c.label_dropout:
                dropped = torch.rand(label.shape, device=label.device) < c.label_dropout
                label = torch.where(dropped, c.null_label, label)
            class_map = rearrange(self.class_embed(label), "b d -> b d 1 1")
            cond_map = class_map if cond_map is None else cond_map + class_map
        return cond_map

    # -- the network ------------------------------------------------------------------------

    def forward(self, x, label=None, cond=None):
        """(B, 3, H, W) pixels or (B, H, W) codes -> (B, P, H, W); P = 10 * n_mixtures or n_codes."""
        self.check_input(x)
        cond_map = self.condition(x.shape[0], label, cond)
        # channels_last from here on: oneDNN's convolutions run several times faster on it
        raw = self.raw_input(x).contiguous(memory_format=torch.channels_last)
        inputs = torch.cat([raw, torch.ones_like(raw[:, :1])], dim=1)
        h = self.input(inputs)
        vertical = None if self.vertical_input is None else self.vertical_input(inputs)
        for block in self.blocks:
            h, vertical = block(h, vertical, raw, self.background, cond_map)
        for block in self.out_blocks:
            h = block(h, cond=cond_map)
        return self.output(h)

    def output(self, h):
        """The head, in its weights' precision (fp32) even under autocast: bf16 would round the
        mixture means to about half a pixel level near +-1, and the logits to ~0.4%."""
        with torch.autocast(h.device.type, enabled=False):
            return self.head(F.elu(h.to(self.head.bias.dtype)))

    def nll(self, x, label=None, cond=None):
        """Per-example negative log-likelihood in bits per dimension (per code in code mode), (B,).

        The likelihood is computed in fp32 even under autocast.
        """
        return self.output_nll(x, self(x, label, cond))

    def output_nll(self, x, out):
        """`nll` from an output already computed (a trainer calls its wrapped model itself)."""
        if self.config.pixel_mode:
            return mixture.nll_bits_per_dim(x, out)
        return self.output_bits_map(x, out).flatten(1).mean(dim=1)

    def output_bits_map(self, x, out):
        """The bits at each position, (B, H, W), in fp32: -log2 P(x at the position | what precedes
        it), a pixel's three values together in pixel mode. Their sum over an example is its total
        bits; `output_nll` is their mean per dimension (per code)."""
        if self.config.pixel_mode:
            return -mixture.log_prob(x, out) / math.log(2)
        # over (B*H*W, K) rows: a view of channels_last logits, where the per-pixel softmax of a
        # (B, K, H, W) cross_entropy would first copy them to the contiguous layout
        logits = rearrange(out.float(), "b k h w -> (b h w) k")
        with torch.autocast(x.device.type, enabled=False):
            nats = F.cross_entropy(logits, rearrange(x, "b h w -> (b h w)"), reduction="none")
        return rearrange(nats, "(b h w) -> b h w", b=x.shape[0], h=x.shape[1]) / math.log(2)

    @torch.no_grad()
    def init_from_data(self, x, label=None, cond=None):
        """Data-dependent weight-norm initialisation on a batch; call once before training."""
        with evaluating(self):  # no dropout while measuring statistics
            init_from_data(self, x, label, cond)

    # -- sampling ---------------------------------------------------------------------------

    def draw(self, out, generator=None, drawing=Drawing(), position=0):
        """Draws values at one position from the output there: (B, P, 1, 1) -> (B, 3) or (B,), for
        the whole batch in a constant number of tensor ops.

        `generator`: per-sample keys (prior.noise.SampleKeys), whose draws depend on each sample's
        key and the raster `position` (an int or a 0-dim tensor) alone, not on the batch; or a
        torch.Generator (or None) for the batch. `drawing`: the code mode's temperature, top-k and
        top-p (prior.drawing)."""
        count = self.config.n_mixtures + 3 if self.config.pixel_mode else self.config.n_codes
        noise = uniforms(generator, position, len(out), count, out.device)  # (B, count)
        if self.config.pixel_mode:
            return mixture.sample(out, rearrange(noise, "b n -> b n 1 1"))[:, :, 0, 0]
        return draw_codes(out[:, :, 0, 0], noise, drawing)

    def sample(self, n, label=None, cond=None, generator=None, temperature=1.0, cache=True, progress=False, **options):
        """n samples in raster order: (n, 3, H, W) in [-1, 1] or (n, H, W) codes.

        cache=True computes only the new position at each step (prior.sampling); cache=False
        runs the whole network once per position. Both draw the same samples for the same
        generator state. progress=True shows a bar over positions. `options`: the samplers'
        prefix, kept, top_k, top_p and guidance (prior.sampling.sample_cached).
        """
        sampler = sampling.sample_cached if cache else sampling.sample_naive
        return sampler(self, n, label, cond, generator, temperature, progress, **options)
