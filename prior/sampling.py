"""Incremental ("cached") sampling for PixelSNAIL: the same draws as `PixelSNAIL.sample`, fast.

The naive sampler runs the whole network once per position, O(N) forwards for N positions.
But everything the network computes at position (i, j) depends only on earlier positions
(Ramachandran et al. 2017, "Fast generation for convolutional autoregressive models"). So we
walk the grid in raster order and compute each layer at the new position only:

- every k x k causal conv keeps its whole input grid, zero-padded as the layer pads it, filled in
  position by position; its output at (i, j) is one k x k window of that grid times the weight;
- every attention block keeps the keys and values of the positions already drawn, and attends
  the query at position p to keys 0..p-1;
- the conditioning map (class embedding, conditioning stack) is computed once;
- a two-stream model's vertical stream reads only the rows above, every column of them: it is
  computed a whole row at a time, when the row above is complete, before the row's first draw.

At one position an activation is a vector per example, (B, C), and every conv a matrix product
(F.linear): on a tiny window that is several times faster than F.conv2d. Memory stays linear
in the number of positions: there is never an N x N attention matrix. Each draw calls
`model.draw` on the output at its position, so a seeded generator is consumed exactly as the
naive sampler consumes it and both return the same samples.

Example:
    >>> model = PixelSNAIL(get_preset("cpu-small").model)
    >>> images = sample_cached(model, 16, generator=torch.Generator().manual_seed(0))  # (16, 3, 32, 32)
"""

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from prior.drawing import Drawing, guide
from prior.layers import AttentionBlock, CausalInput, GatedResBlock, ShiftedConv, VerticalInput, WNConv2d, gate
from prior.modes import evaluating


def as_autocast(tensor):
    """`tensor` in the dtype autocast would give it at every call, cast once: the sampler uses each
    weight at every position, and under bf16 autocast a cast of every weight at every step costs
    more than the step's arithmetic (the same values either way)."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return tensor.to(torch.get_autocast_dtype(device))
    return tensor


class Pointwise:
    """A 1x1 conv at one position, (B, C_in) -> (B, C_out), or over a row, (B, C_in, 1, W) ->
    (B, C_out, 1, W). It reads no other position. `autocast=False` keeps the weights' own
    precision (the head runs in fp32)."""

    def __init__(self, conv: WNConv2d, autocast=True):
        cast = as_autocast if autocast else (lambda tensor: tensor)
        self.weight = cast(conv.weight)  # (C_out, C_in, 1, 1), the weight-normalised weight
        self.bias = cast(conv.bias)

    def __call__(self, x):
        if x.dim() == 4:
            return F.conv2d(x, self.weight, self.bias)
        return F.linear(x, self.weight[:, :, 0, 0], self.bias)


class ConvWindow:
    """A ShiftedConv evaluated one position (or one row) at a time.

    Holds the conv's input grid, zero-padded exactly as ShiftedConv pads it and filled in as
    positions are computed. The output at (i, j) comes from the window whose top-left corner is
    (i, j) in padded coordinates: the very numbers the full conv reads there. `j=None` stands for
    the whole row i: inputs and outputs are then (B, C, 1, W).
    """

    def __init__(self, layer: ShiftedConv, batch_size, shape):
        left, right, top, bottom = layer.padding
        height, width = shape
        self.top, self.left, self.width = top, left, width
        self.kernel_size = layer.conv.kernel_size
        self.weight = as_autocast(layer.conv.weight)  # (C_out, C_in, kh, kw), the weight-normalised weight
        self.bias = as_autocast(layer.conv.bias)
        self.inputs = self.bias.new_zeros(  # (B, C_in, H + pads, W + pads)
            batch_size, layer.conv.in_channels, top + height + bottom, left + width + right
        )

    def write(self, i, j, x):
        """Stores the conv's input at (i, j), x (B, C_in); or over row i (j=None), x (B, C_in, 1, W)."""
        if j is None:
            self.inputs[:, :, self.top + i, self.left : self.left + self.width] = x[:, :, 0]
        else:
            self.inputs[:, :, self.top + i, self.left + j] = x

    def output_at(self, i, j):
        """(B, C_out), or (B, C_out, 1, W) for row i (j=None). The conv is causal, so the window
        holds only inputs already written."""
        kernel_height, kernel_width = self.kernel_size
        if j is None:
            return F.conv2d(self.inputs[:, :, i : i + kernel_height], self.weight, self.bias)
        window = self.inputs[:, :, i : i + kernel_height, j : j + kernel_width]
        return F.linear(rearrange(window, "b c kh kw -> b (c kh kw)"), self.weight.flatten(1), self.bias)

    def __call__(self, i, j, x):
        """For convs that read their own position: writes the input at (i, j), then convolves."""
        self.write(i, j, x)
        return self.output_at(i, j)


def conv_at_position(layer: ShiftedConv, batch_size, shape):
    """The conv as a function (i, j, input at (i, j)) -> output at (i, j). A 1x1 conv needs no
    memory of earlier positions; a k x k one keeps its input grid."""
    if layer.conv.kernel_size == (1, 1):
        pointwise = Pointwise(layer.conv)
        return lambda i, j, x: pointwise(x)
    return ConvWindow(layer, batch_size, shape)


class CachedInput:
    """CausalInput at one position. It reads only positions strictly before (i, j), so the raw
    input of a position is written after that position is drawn."""

    def __init__(self, layer: CausalInput, batch_size, shape):
        self.above = ConvWindow(layer.above, batch_size, shape)
        self.left = ConvWindow(layer.left, batch_size, shape)

    def write(self, i, j, x):
        """Stores the input (raw values and the ones channel) of a drawn position: (B, C_in)."""
        self.above.write(i, j, x)
        self.left.write(i, j, x)

    def output_at(self, i, j):
        """(B, C): down_shift(above) + right_shift(left), whose shifts bring in zeros at the top
        row and the left column."""
        batch_size = self.above.inputs.shape[0]
        out = self.above.bias.new_zeros(batch_size, len(self.above.bias))
        if i > 0:
            out = out + self.above.output_at(i - 1, j)
        if j > 0:
            out = out + self.left.output_at(i, j - 1)
        return out


class CachedVerticalInput:
    """VerticalInput over a row: row i is the conv's output at row i - 1 (zeros at row 0), so it
    reads raw inputs of rows above i only, all written before row i starts."""

    def __init__(self, layer: VerticalInput, batch_size, shape):
        self.conv = ConvWindow(layer.conv, batch_size, shape)

    def write(self, i, j, x):
        self.conv.write(i, j, x)

    def output_row(self, i):
        """(B, C, 1, W)."""
        if i == 0:
            return self.conv.bias.new_zeros(self.conv.inputs.shape[0], len(self.conv.bias), 1, self.conv.width)
        return self.conv.output_at(i - 1, None)


class CachedGatedResBlock:
    """GatedResBlock.forward at one position, (B, C) tensors, or over row i (j=None), (B, C, 1, W)
    tensors, as the vertical stream is computed (dropout is off when sampling)."""

    def __init__(self, block: GatedResBlock, batch_size, shape):
        self.conv1 = conv_at_position(block.conv1, batch_size, shape)
        self.aux = None if block.aux is None else Pointwise(block.aux)
        self.cond = None if block.cond is None else Pointwise(block.cond)
        self.conv2 = conv_at_position(block.conv2, batch_size, shape)

    def __call__(self, i, j, x, aux=None, cond=None):
        h = self.conv1(i, j, F.elu(x))
        if self.aux is not None:
            h = h + self.aux(F.elu(aux))
        if self.cond is not None:
            h = h + self.cond(cond)
        return gate(x, self.conv2(i, j, F.elu(h)))


class CachedAttention:
    """An AttentionBlock at one position, keeping the keys and values of the positions drawn.

    A key holds the raw input of its position, known only once that position is drawn: `write`
    adds it then, and the query at position p attends to keys 0..p-1, exactly the positions
    causal_attention lets it see.
    """

    def __init__(self, block: AttentionBlock, batch_size, shape):
        self.width = shape[1]
        self.n_heads = block.n_heads
        self.key_channels = block.key_channels
        self.kv_block = CachedGatedResBlock(block.kv_block, batch_size, shape)
        self.to_kv = Pointwise(block.to_kv)
        self.q_block = CachedGatedResBlock(block.q_block, batch_size, shape)
        self.to_q = Pointwise(block.to_q)
        self.out_block = CachedGatedResBlock(block.out_block, batch_size, shape)
        n_positions = shape[0] * shape[1]
        key_size = block.key_channels // block.n_heads
        value_size = (block.to_kv.out_channels - block.key_channels) // block.n_heads
        self.keys = self.to_kv.bias.new_zeros(batch_size, block.n_heads, n_positions, key_size)
        self.values = self.to_kv.bias.new_zeros(batch_size, block.n_heads, n_positions, value_size)
        self.features = None  # (B, C): the block's input at the position being computed, for `write`

    def __call__(self, i, j, h, background, cond):
        self.features = h
        query = self.to_q(self.q_block(i, j, torch.cat([h, background], dim=1)))  # (B, C_k)
        attended = self.attend(query, i * self.width + j)
        return self.out_block(i, j, h, aux=attended, cond=cond)

    def attend(self, query, position):
        """(B, C_k) -> (B, C_v): attention over keys 0..position-1; zeros at position 0."""
        batch_size, n_heads, _, value_size = self.values.shape
        if position == 0:
            return self.values.new_zeros(batch_size, n_heads * value_size)
        q = rearrange(query, "b (h d) -> b h 1 d", h=n_heads).to(self.keys.dtype)
        keys, values = self.keys[:, :, :position], self.values[:, :, :position]
        # in the cache's precision: under autocast every step would copy all keys and values to
        # bf16, and a GPU would plan a new bf16 attention kernel for every new number of keys
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q, keys, values)  # (B, heads, 1, d_v)
        return rearrange(out, "b h 1 d -> b (h d)")

    def write(self, i, j, raw, background):
        """Adds the key and value of drawn position (i, j), from its raw input (B, C_in)."""
        key_value = self.to_kv(self.kv_block(i, j, torch.cat([raw, self.features, background], dim=1)))
        key, value = key_value[:, : self.key_channels], key_value[:, self.key_channels :]
        position = i * self.width + j
        self.keys[:, :, position] = rearrange(key, "b (h d) -> b h d", h=self.n_heads)
        self.values[:, :, position] = rearrange(value, "b (h d) -> b h d", h=self.n_heads)


class CachedBlock:
    """A PixelSNAILBlock at one position; in a two-stream model, `start_row` first computes its
    vertical stream over the whole row."""

    def __init__(self, block, batch_size, shape):
        self.res_blocks = [CachedGatedResBlock(res_block, batch_size, shape) for res_block in block.res_blocks]
        self.vertical = [] if block.vertical is None else [
            CachedGatedResBlock(res_block, batch_size, shape) for res_block in block.vertical
        ]
        self.vertical_rows = []  # (B, C, 1, W) per vertical gated resnet: the stream at the current row
        self.attention = None
        if block.attention is not None:
            self.attention = CachedAttention(block.attention, batch_size, shape)

    def start_row(self, i, vertical, cond):
        """Row i of the vertical stream entering the block, (B, C, 1, W) -> the one leaving it."""
        self.vertical_rows = []
        for res_block in self.vertical:
            vertical = res_block(i, None, vertical, cond=cond)
            self.vertical_rows.append(vertical)
        return vertical

    def __call__(self, i, j, h, background, cond):
        for index, res_block in enumerate(self.res_blocks):
            aux = self.vertical_rows[index][:, :, 0, j] if self.vertical_rows else None
            h = res_block(i, j, h, aux=aux, cond=cond)
        if self.attention is not None:
            h = self.attention(i, j, h, background, cond)
        return h


class IncrementalPixelSNAIL:
    """PixelSNAIL evaluated one position at a time in raster order: `output_at(i, j)`, draw, then
    `write(i, j, drawn)` before moving on. Takes a snapshot of the model's weights."""

    def __init__(self, model, batch_size, cond_map):
        shape = model.config.shape
        self.model = model
        self.background = model.background.expand(batch_size, -1, -1, -1)  # (B, 2, H, W)
        # (B, D, H, W) whether spatial or per-example (B, D, 1, 1); a view, no copy
        self.cond_map = None if cond_map is None else cond_map.expand(-1, -1, *shape)
        self.input = CachedInput(model.input, batch_size, shape)
        self.vertical_input = None
        if model.vertical_input is not None:
            self.vertical_input = CachedVerticalInput(model.vertical_input, batch_size, shape)
        self.blocks = [CachedBlock(block, batch_size, shape) for block in model.blocks]
        self.out_blocks = [CachedGatedResBlock(block, batch_size, shape) for block in model.out_blocks]
        self.head = Pointwise(model.head, autocast=False)

    def start_row(self, i):
        """The vertical stream over row i, through every block: rows above i are all written."""
        cond = None if self.cond_map is None else self.cond_map[:, :, i : i + 1]  # (B, D, 1, W)
        vertical = self.vertical_input.output_row(i)
        for block in self.blocks:
            vertical = block.start_row(i, vertical, cond)

    def output_at(self, i, j):
        """The network's output at (i, j), (B, P, 1, 1) as `model.draw` takes it, from the
        positions written so far."""
        if self.vertical_input is not None and j == 0:
            self.start_row(i)
        background = self.background[:, :, i, j]  # (B, 2)
        cond = None if self.cond_map is None else self.cond_map[:, :, i, j]  # (B, D)
        h = self.input.output_at(i, j)  # (B, C)
        for block in self.blocks:
            h = block(i, j, h, background, cond)
        for block in self.out_blocks:
            h = block(i, j, h, cond=cond)
        with torch.autocast(h.device.type, enabled=False):  # in fp32, as PixelSNAIL.output
            out = self.head(F.elu(h.to(self.model.head.bias.dtype)))
        return rearrange(out, "b p -> b p 1 1")

    def write(self, i, j, drawn):
        """Feeds the values drawn at (i, j) back in: (B, 3, 1, 1) pixels or (B, 1, 1) codes."""
        raw = self.model.raw_input(drawn)[:, :, 0, 0]  # (B, C_in)
        inputs = torch.cat([raw, torch.ones_like(raw[:, :1])], dim=1)
        self.input.write(i, j, inputs)
        if self.vertical_input is not None:
            self.vertical_input.write(i, j, inputs)
        background = self.background[:, :, i, j]
        for block in self.blocks:
            if block.attention is not None:
                block.attention.write(i, j, raw, background)


def raster_order(shape, progress=False, start=0):
    """Yields the positions (i, j) of a grid row by row from raster position `start` on, with a
    progress bar if asked."""
    height, width = shape
    positions = (divmod(p, width) for p in range(start, height * width))
    n = height * width - start
    return tqdm(positions, total=n, desc="positions", leave=False) if progress else positions


@dataclass
class Job:
    """One sampling call, checked: the grid to fill (n, 3, H, W) or (n, H, W), the prefix's kept
    positions already in it, and the conditions the network runs on, (2n, ...) under guidance:
    the conditional batch, then the same with the null class."""

    x: Tensor
    kept: int
    label: Tensor | None
    cond: Tensor | None
    drawing: Drawing

    @property
    def batch_size(self):
        return len(self.x) * (2 if self.drawing.guided else 1)

    def network_input(self, values):
        """The grid (or values at one position) as the network's batch: twice under guidance."""
        return torch.cat([values, values]) if self.drawing.guided else values

    def draw(self, model, out, generator):
        """The network's output at one position, (batch_size, P, 1, 1) -> the n values drawn there."""
        if self.drawing.guided:
            out = guide(out, self.drawing.guidance)
        return model.draw(out, generator, self.drawing)


def start_job(model, n, label, cond, prefix, kept, drawing) -> Job:
    """Checks the sampling arguments -> the Job. `prefix` (the grid's shape) gives the values of
    the first `kept` raster positions; the rest of it is ignored."""
    c = model.config
    drawing.check(c)
    n_positions = math.prod(c.shape)
    if not 0 <= kept <= n_positions:
        raise ValueError(f"kept must lie in [0, {n_positions}] (positions of the grid), got {kept}")
    device = model.background.device
    if c.pixel_mode:
        x = torch.zeros(n, 3, *c.shape, device=device, dtype=model.head.bias.dtype)
    else:
        x = torch.zeros(n, *c.shape, dtype=torch.long, device=device)
    if kept:
        if prefix is None or tuple(prefix.shape) != tuple(x.shape) or prefix.is_floating_point() != x.is_floating_point():
            given = None if prefix is None else f"{prefix.dtype} {tuple(prefix.shape)}"
            raise ValueError(f"kept > 0 needs a prefix of the samples' shape {tuple(x.shape)} and kind, got {given}")
        is_kept = torch.arange(n_positions, device=device).view(c.shape) < kept  # (H, W)
        x = torch.where(is_kept, prefix.to(x), x)
    if drawing.guided:
        null = torch.full((n,), c.null_label, dtype=torch.long, device=device)
        label = None if label is None else torch.cat([label, null])
        cond = None if cond is None else torch.cat([cond, cond])
    return Job(x, kept, label, cond, drawing)


@torch.no_grad()
def sample_naive(model, n, label=None, cond=None, generator=None, temperature=1.0, progress=False, *,
                 prefix=None, kept=0, top_k=None, top_p=None, guidance=None) -> Tensor:
    """The reference sampler: one full forward pass per position, O(N) forwards for N positions."""
    job = start_job(model, n, label, cond, prefix, kept, Drawing(temperature, top_k, top_p, guidance))
    x = job.x
    with evaluating(model):
        for i, j in raster_order(model.config.shape, progress, job.kept):
            out = model(job.network_input(x), job.label, job.cond)[:, :, i : i + 1, j : j + 1]
            x[..., i, j] = job.draw(model, out, generator)
    return x


@torch.no_grad()
def sample_cached(model, n, label=None, cond=None, generator=None, temperature=1.0, progress=False, *,
                  prefix=None, kept=0, top_k=None, top_p=None, guidance=None) -> Tensor:
    """n samples in raster order, (n, 3, H, W) in [-1, 1] or (n, H, W) codes: exactly what
    `sample_naive` returns for the same arguments and generator state, computing one new
    position per step instead of the whole grid.

    `prefix`, `kept`: the first `kept` raster positions are `prefix`'s (returned unchanged; fed
    through the caches without drawing), sampling starts after them. `top_k`, `top_p`,
    `guidance`: see prior.drawing; under guidance the conditional and the null-class batch run
    as one batch of 2n.
    """
    job = start_job(model, n, label, cond, prefix, kept, Drawing(temperature, top_k, top_p, guidance))
    x, shape = job.x, model.config.shape
    with evaluating(model):
        network = IncrementalPixelSNAIL(model, job.batch_size, model.condition(job.batch_size, job.label, job.cond))
        for i, j in itertools.islice(raster_order(shape), job.kept):
            network.output_at(i, j)  # fills the layers' caches at (i, j)
            network.write(i, j, job.network_input(x[..., i : i + 1, j : j + 1]))
        for i, j in raster_order(shape, progress, job.kept):
            x[..., i, j] = job.draw(model, network.output_at(i, j), generator)
            network.write(i, j, job.network_input(x[..., i : i + 1, j : j + 1]))
    return x
