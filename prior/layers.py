"""PixelSNAIL's building blocks: shifted causal convolutions, gated residual blocks, causal attention.

Causality comes from shifting, as in PixelCNN++ and the official PixelSNAIL code, never from
masking weights: a convolution is padded only on the top and left, so its output at (i, j)
reads inputs at rows <= i and columns <= j. The first layer adds one shift more, so that no
position ever sees itself; every later layer may then include its own position.

Every convolution is weight-normalised (Salimans & Kingma 2016) and carries an `init_scale`
used by `init_from_data`, the data-dependent initialisation.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.utils.parametrizations import weight_norm


class WNConv2d(nn.Conv2d):
    """A weight-normalised convolution with no padding of its own (callers pad)."""

    def __init__(self, in_channels, out_channels, kernel_size, init_scale=1.0):
        super().__init__(in_channels, out_channels, kernel_size)
        weight_norm(self)
        self.init_scale = init_scale


def nin(in_channels, out_channels, init_scale=1.0):
    """A 1x1 convolution ("network in network")."""
    return WNConv2d(in_channels, out_channels, 1, init_scale)


def down_shift(x):
    """Moves every row one down: row i now holds what row i - 1 held, row 0 holds zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x):
    """Moves every column one right: column j now holds what column j - 1 held."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class ShiftedConv(nn.Module):
    """A convolution with explicit (left, right, top, bottom) zero padding."""

    def __init__(self, in_channels, out_channels, kernel_size, padding, init_scale=1.0):
        super().__init__()
        self.padding = padding
        self.conv = WNConv2d(in_channels, out_channels, kernel_size, init_scale)

    def forward(self, x):
        if any(self.padding):  # F.pad copies even when it pads nothing (the 1x1 convs)
            x = F.pad(x, self.padding)
        return self.conv(x)


def causal_conv(in_channels, out_channels, kernel_size, init_scale=1.0):
    """k x k down-right shifted conv: output (i, j) reads rows i-k+1..i, columns j-k+1..j."""
    k = kernel_size
    return ShiftedConv(in_channels, out_channels, (k, k), (k - 1, 0, k - 1, 0), init_scale)


def down_conv(in_channels, out_channels, kernel_size, init_scale=1.0):
    """k x w down-shifted conv, w = 2 * (k // 2) + 1 (PixelCNN++'s 2x3 for k = 2): output (i, j)
    reads rows i-k+1..i and every column j-k//2..j+k//2 of them, to the right of j as well."""
    k, half = kernel_size, kernel_size // 2
    return ShiftedConv(in_channels, out_channels, (k, 2 * half + 1), (half, half, k - 1, 0), init_scale)


def same_conv(in_channels, out_channels, kernel_size, init_scale=1.0):
    """A centred (non-causal) conv, for the conditioning stack; kernel_size must be odd."""
    p = kernel_size // 2
    return ShiftedConv(in_channels, out_channels, (kernel_size,) * 2, (p, p, p, p), init_scale)


class CausalInput(nn.Module):
    """The first layer: output (i, j) reads only positions strictly before (i, j).

    Sum of a conv over the rows above (down-shifted) and a conv over the columns to the left in
    the current and previous rows (right-shifted). For kernel_size k = 2 these are PixelCNN++'s
    1x3 and 2x1 convolutions: (i, j) sees (i-1, j-1..j+1) and (i-1..i, j-1).
    """

    def __init__(self, in_channels, out_channels, kernel_size=2):
        super().__init__()
        k = kernel_size
        # rows i-k+1..i-1 after the down shift, columns j-k+1..j+k-1
        self.above = ShiftedConv(in_channels, out_channels, (k - 1, 2 * k - 1), (k - 1, k - 1, k - 2, 0))
        # rows i-k+1..i, columns j-k+1..j-1 after the right shift
        self.left = ShiftedConv(in_channels, out_channels, (k, k - 1), (k - 2, 0, k - 1, 0))

    def forward(self, x):
        return down_shift(self.above(x)) + right_shift(self.left(x))


class VerticalInput(nn.Module):
    """The first layer of the vertical stream: output (i, j) reads only rows strictly above i,
    columns j-k//2..j+k//2 (a down-shifted `down_conv`)."""

    def __init__(self, in_channels, out_channels, kernel_size=2):
        super().__init__()
        self.conv = down_conv(in_channels, out_channels, kernel_size)

    def forward(self, x):
        return down_shift(self.conv(x))


class Dropout(nn.Module):
    """Inverted dropout with a cheaper mask than nn.Dropout's (a quarter of a bf16 step on this
    project's CPU went to drawing masks): see `keep_mask`."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if torch.compiler.is_compiling():  # inductor fuses its own mask into the neighbouring ops
            return F.dropout(x, self.p, training=True)
        keep, keep_probability = keep_mask(x, self.p)
        return x * keep.to(x.dtype).mul_(1 / keep_probability)

    def extra_repr(self):
        return f"p={self.p}"


def keep_mask(x, p):
    """Booleans of x's shape and memory layout, each True with probability 1 - p', independently.

    Every 32-bit draw of the generator gives two elements, so this costs half of torch.rand's
    draws. A draw holds 31 random bits; shifted left by one, its high 16 bits are uniform over
    all int16 values and its low 16 bits uniform over the even ones, so one threshold keeps each
    half with the same probability. p' is p rounded to a multiple of 1/32768 (0.1 becomes
    0.100006, 0.5 stays exact); returns (mask, 1 - p').
    """
    n = x.numel()
    dropped = min(round(p * 32768), 32767)  # out of 32768
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_().bitwise_left_shift_(1)
    keep = (bits.view(torch.int16) >= 2 * dropped - 32768)[:n]
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        keep = keep.as_strided(x.shape, x.stride())  # the draws are iid: any order of them will do
    else:
        keep = keep.view(x.shape)
    return keep, 1 - dropped / 32768


class GatedResBlock(nn.Module):
    """x + a * sigmoid(b), (a, b) = conv2(dropout(elu(conv1(elu(x)) + nin(elu(aux)) + proj(cond)))).

    `aux` is a per-position input of `aux_channels` (the attention output, or the vertical stream
    in a two-stream model); `cond` is the conditioning map of `cond_channels` (class embedding
    and/or the processed code grid of another level), either (B, D, H, W) or (B, D, 1, 1), added
    in every block. `mode` is "causal" (down-right shifted k x k), "down" (down-shifted, the
    vertical stream) or "same" (centred, for non-causal stacks).

    res_channels=None is the official PixelSNAIL block: conv1 and conv2 both k x k, conv1 keeping
    `channels`. res_channels=R is the VQ-VAE-2 priors' residual unit: conv1 k x k to R channels,
    conv2 a 1x1 back to the gate's 2 x channels. The paper's table gives "residual units" for its
    VQ-VAE and its priors alike, and the VQ-VAE's are this 3x3-then-1x1 bottleneck (vqvae.model).
    """

    def __init__(self, channels, kernel_size, mode="causal", res_channels=None, aux_channels=0, cond_channels=0,
                 dropout=0.0):
        super().__init__()
        make_conv = {"causal": causal_conv, "down": down_conv, "same": same_conv}[mode]
        inner = res_channels or channels
        self.conv1 = make_conv(channels, inner, kernel_size)
        self.aux = nin(aux_channels, inner) if aux_channels else None
        self.cond = nin(cond_channels, inner) if cond_channels else None
        self.dropout = Dropout(dropout)
        # small init_scale keeps the residual stream's variance from growing with depth
        self.conv2 = make_conv(inner, 2 * channels, 1 if res_channels else kernel_size, init_scale=0.1)

    def forward(self, x, aux=None, cond=None):
        h = self.conv1(F.elu(x))
        if self.aux is not None:
            h = h + self.aux(F.elu(aux))
        if self.cond is not None:
            h = h + self.cond(cond)
        return gate(x, self.conv2(self.dropout(F.elu(h))))


def gate(x, h):
    """The gated residual update x + a * sigmoid(b), (a, b) = h split in two along channels."""
    a, b = h.chunk(2, dim=1)
    return x + a * torch.sigmoid(b)


def causal_attention(query, key, value, n_heads=1, dropout=0.0):
    """Attention in raster order where position i attends only to positions j < i.

    query, key: (B, Ck, H, W); value: (B, Cv, H, W) -> (B, Cv, H, W). Position 0 has nothing
    to attend to and gets zeros. The keys hold the raw input of their position, so the diagonal
    must stay excluded: this is what keeps the model autoregressive.

    Computed without an N x N mask, so the fused (flash) kernel can run with memory linear in N:
    keys and values move one position later and a "null" key with value zero takes position 0.
    Ordinary causal attention (j' <= i) over the moved sequence is then attention over the null
    key and the original keys j < i. The null key has one extra coordinate, -1e9, which only the
    queries' extra coordinate 1 meets: its score is -1e9 against any real score, so it gets
    weight exp(-1e9 - max) = 0, except at position 0 where it is alone and returns its value 0.
    Head sizes are zero-padded to one width (zeros change no dot product): the fused kernel
    wants q, k and v of equal width.

    `dropout`: the probability of dropping each weight of the attention matrix after the softmax
    (the survivors scaled by 1 / (1 - dropout)), VQ-VAE-2's "dropout on the logits of each
    attention matrix" as attention dropout is usually built; the fused kernels draw the mask
    themselves. Dropping weights never adds a dependence, so causality holds with it; the caller
    passes 0 outside training. The null key's weight is 0, or at position 0 it meets value 0, so
    dropping it changes nothing.

    On CPU this runs in fp32 even under bf16 autocast: the CPU kernel's backward is faster in
    fp32 than in bf16 here (66 vs 88 ms for 8 x 8 heads x 1024 positions). Fused kernels keep
    the softmax in fp32 either way.
    """
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            out = causal_attention(query.float(), key.float(), value.float(), n_heads, dropout)
        return out.to(value.dtype)
    height, width = query.shape[-2:]
    q, k, v = (rearrange(t, "b (h d) x y -> b h (x y) d", h=n_heads) for t in (query, key, value))
    key_width, value_width = k.shape[-1], v.shape[-1]
    head_width = max(key_width + 1, value_width)
    q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
    k = torch.cat([k, torch.zeros_like(k[..., :1])], dim=-1)
    q, k, v = (F.pad(t, (0, head_width - t.shape[-1])) for t in (q, k, v))
    null_key = torch.zeros_like(k[:, :, :1])
    null_key[..., key_width] = -1e9
    k = torch.cat([null_key, k[:, :, :-1]], dim=2)
    v = torch.cat([torch.zeros_like(v[:, :, :1]), v[:, :, :-1]], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=key_width**-0.5)
    return rearrange(out[..., :value_width], "b h (x y) d -> b (h d) x y", x=height)


class AttentionBlock(nn.Module):
    """PixelSNAIL's attention block, as the official code builds it.

    Keys and values come from a 1x1 gated resnet over [raw input, features, background];
    queries from one over [features, background]. The attention output then enters a 1x1 gated
    resnet on the features as its auxiliary input. `attention_dropout` drops attention weights
    in training mode only (see causal_attention).
    """

    def __init__(self, channels, input_channels, key_channels, value_channels, n_heads, cond_channels, dropout,
                 attention_dropout=0.0):
        super().__init__()
        kv_in = input_channels + channels + 2
        q_in = channels + 2
        self.key_channels = key_channels
        self.kv_block = GatedResBlock(kv_in, 1, dropout=dropout)
        self.to_kv = nin(kv_in, key_channels + value_channels)
        self.q_block = GatedResBlock(q_in, 1, dropout=dropout)
        self.to_q = nin(q_in, key_channels)
        self.n_heads = n_heads
        self.attention_dropout = attention_dropout
        self.out_block = GatedResBlock(
            channels, 1, aux_channels=value_channels, cond_channels=cond_channels, dropout=dropout
        )

    def forward(self, h, raw, background, cond=None):
        # everything in h's dtype (bf16 under autocast): an fp32 raw input or background would
        # make the concatenation fp32, and with it the whole 1x1 stack after it, casts included
        background = background.expand(h.shape[0], -1, -1, -1).to(h.dtype)
        key_value = self.to_kv(self.kv_block(torch.cat([raw.to(h.dtype), h, background], dim=1)))
        key, value = key_value.split([self.key_channels, key_value.shape[1] - self.key_channels], dim=1)
        query = self.to_q(self.q_block(torch.cat([h, background], dim=1)))
        attended = causal_attention(query, key, value, self.n_heads, self.attention_dropout if self.training else 0.0)
        return self.out_block(h, aux=attended, cond=cond)


def positional_background(height, width):
    """(1, 2, H, W): row and column coordinates, (r - H/2)/H and (c - W/2)/W."""
    rows = (torch.arange(height) - height / 2) / height
    cols = (torch.arange(width) - width / 2) / width
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))[None]


@torch.no_grad()
def init_from_data(model, *inputs, **kwargs):
    """Data-dependent weight-norm initialisation (Salimans & Kingma 2016).

    Runs `model(*inputs, **kwargs)` once; each WNConv2d, in forward order, rescales its gain and
    sets its bias so that its output over the batch has zero mean and `init_scale` standard
    deviation per channel. Later layers therefore see already-initialised inputs.
    """

    def rescale(conv, _inputs, output):
        gain = conv.parametrizations.weight.original0  # (C_out, 1, 1, 1)
        raw = output - conv.bias.view(1, -1, 1, 1)
        mean = raw.mean(dim=(0, 2, 3))
        # a channel that barely varies on this batch (degenerate data) is not blown up: at most 10x
        scale = conv.init_scale * torch.rsqrt(raw.var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-2))
        gain.mul_(scale.view(-1, 1, 1, 1))
        conv.bias.copy_(-mean * scale)
        return (raw - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)

    hooks = [m.register_forward_hook(rescale) for m in model.modules() if isinstance(m, WNConv2d)]
    try:
        model(*inputs, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
