"""Incremental ("cached") sampling for PixelSNAIL: the same draws as `PixelSNAIL.sample`, fast.

The naive sampler runs the whole network once per position, O(N) forwards for N positions.
But everything the network computes at position (i, j) depends only on earlier positions
(Ramachandran et al. 2017, "Fast generation for convolutional autoregressive models"). So we
walk the grid in raster order and compute each layer at the new position only:

- every k x k causal conv keeps the last k + 1 rows of its input, zero-padded as the layer pads
  it, filled in position by position; its output at (i, j) is one k x k window times the weight;
- every attention block keeps the keys and values of the positions already drawn, and attends
  the query at position p to keys 0..p-1;
- the conditioning map (class embedding, conditioning stack) is computed once;
- whatever the rows above determine is computed a whole row at a time, when the row above is
  complete, before the row's first draw: a two-stream model's vertical stream (it reads only the
  rows above), and in every gated resnet the part of its k x k conv that reads the rows above,
  with the bias, the condition and the vertical stream's input. A position then computes only
  the part of each conv that reads its own row.

At one position an activation is a vector per example, (B, C), and every conv a matrix product
(F.linear): on a tiny window that is several times faster than F.conv2d. Such a step is bound
by memory, not arithmetic: at batch 16 each weight it reads serves 16 products. Moving the rows
above into one matmul per row (every output column of the row at once) reads those weights
once per row instead of once per position: at kernel size 5, a fifth of a gated resnet's k x k
weights remain per position. Memory stays linear in the number of positions: there is never an
N x N attention matrix. Each draw calls `model.draw` on the output at its position, so a
seeded generator is consumed exactly as the naive sampler consumes it and both return the same
samples.

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


class PaddedRows:
    """The last rows of a conv's input grid, zero-padded exactly as ShiftedConv pads it.

    A conv reads at most its kernel's height of rows while the row being written may lie one
    past them, so kh + 1 padded rows are kept, in a ring (padded row r in slot r mod (kh + 1)):
    memory does not grow with the grid's height. A slot reused for a new row still holds an old
    row's values in the columns not yet written, which a causal conv never reads. Channels
    last, (B, kh + 1, W + pads, C_in): a position's window is then one contiguous run per row.
    """

    def __init__(self, layer: ShiftedConv, batch_size, width, dtype):
        left, right, top, _ = layer.padding
        self.top, self.left, self.width = top, left, width
        self.n_slots = layer.conv.kernel_size[0] + 1
        self.rows = torch.zeros(batch_size, self.n_slots, left + width + right, layer.conv.in_channels, dtype=dtype,
                                device=layer.conv.bias.device)

    def write(self, i, j, x):
        """Stores the input at (i, j), x (B, C_in); or over row i (j=None), x (B, C_in, 1, W)."""
        slot = (self.top + i) % self.n_slots
        if j is None:
            self.rows[:, slot, self.left : self.left + self.width] = rearrange(x, "b c 1 w -> b w c")
        else:
            self.rows[:, slot, self.left + j] = x

    def read(self, start, count, columns=slice(None)):
        """Padded rows start..start+count-1, (B, count, columns, C_in): a view unless the rows wrap
        around the ring (advanced indexing would copy, and slowly, even a single row)."""
        first = start % self.n_slots
        if first + count <= self.n_slots:
            return self.rows[:, first : first + count, columns]
        wrapped = first + count - self.n_slots
        return torch.cat([self.rows[:, first:, columns], self.rows[:, :wrapped, columns]], dim=1)

    def row_windows(self, start, count, kernel_width):
        """The windows of padded rows start..start+count-1 under every output column of a row, as
        one matrix (W*B, count*kw*C_in): a conv over the row is then one large matmul."""
        windows = self.read(start, count).unfold(2, kernel_width, 1)  # (B, count, W, C_in, kw)
        return rearrange(windows, "b r w c k -> (w b) (r k c)")


def flat_weight(conv: WNConv2d):
    """(C_out, kh * kw * C_in), in the order of PaddedRows' windows, cast once."""
    return rearrange(as_autocast(conv.weight), "o c r k -> o (r k c)").contiguous()


class ConvWindow:
    """A ShiftedConv evaluated one position (or one row) at a time over its whole kernel.

    The output at (i, j) comes from the window whose top-left corner is (i, j) in padded
    coordinates: the very numbers the full conv reads there. `j=None` stands for the whole row i:
    inputs and outputs are then (B, C, 1, W). For the small first layers and the vertical stream,
    which runs a row at a time; a gated resnet's k x k convs at one position are RowSplitConv.
    """

    def __init__(self, layer: ShiftedConv, batch_size, shape):
        self.kernel_size = layer.conv.kernel_size
        self.weight = flat_weight(layer.conv)  # (C_out, kh * kw * C_in), the weight-normalised weight
        self.bias = as_autocast(layer.conv.bias)
        self.inputs = PaddedRows(layer, batch_size, shape[1], self.bias.dtype)
        self.write = self.inputs.write

    def output_at(self, i, j):
        """(B, C_out), or (B, C_out, 1, W) for row i (j=None). The conv is causal, so the window
        holds only inputs already written."""
        kernel_height, kernel_width = self.kernel_size
        if j is None:
            out = F.linear(self.inputs.row_windows(i, kernel_height, kernel_width), self.weight, self.bias)
            return rearrange(out, "(w b) o -> b o 1 w", b=self.inputs.rows.shape[0])
        window = self.inputs.read(i, kernel_height, slice(j, j + kernel_width))
        return F.linear(rearrange(window, "b r k c -> b (r k c)"), self.weight, self.bias)

    def __call__(self, i, j, x):
        """For convs that read their own position: writes the input at (i, j), then convolves."""
        self.write(i, j, x)
        return self.output_at(i, j)


def row_major(row):
    """(B, C, 1, W) or (B, C, 1, 1) -> (W, B, C) or (1, B, C), in fp32: a row's outputs by column,
    summed in fp32 as one conv would (accumulating partial outputs in bf16 would round each)."""
    return rearrange(row, "b c 1 w -> w b c").float()


class RowSplitConv:
    """A down-right shifted k x k conv of a gated resnet at one position, in two parts.

    Output (i, j) reads rows i-k+1..i. Rows i-k+1..i-1 are complete when row i starts, so their
    part of every output of the row is computed then, for the whole row: one (W*B, (k-1)*k*C_in)
    x ((k-1)*k*C_in, C_out) matmul instead of W small ones, the weights read once per row. At
    each position only the kernel's last row meets the new inputs: 1/k of the weights. Same
    products, same sums (up to their order).
    """

    def __init__(self, layer: ShiftedConv, batch_size, shape):
        self.kernel_size = layer.conv.kernel_size
        weight = flat_weight(layer.conv)  # kernel rows outermost: the rows above, then the last
        last = weight.shape[1] // self.kernel_size[0]
        self.weight_above, self.weight_last = weight[:, :-last].contiguous(), weight[:, -last:].contiguous()
        self.bias = as_autocast(layer.conv.bias)
        self.inputs = PaddedRows(layer, batch_size, shape[1], self.bias.dtype)

    def start_row(self, i):
        """(W, B, C_out) in fp32: the bias and the rows above row i, for every column of row i."""
        kernel_height, kernel_width = self.kernel_size
        out = F.linear(self.inputs.row_windows(i, kernel_height - 1, kernel_width), self.weight_above, self.bias)
        return rearrange(out, "(w b) o -> w b o", b=self.inputs.rows.shape[0]).float()

    def at(self, i, j, x):
        """Writes the input at (i, j), (B, C_in); returns the last kernel row's part, (B, C_out)."""
        kernel_height, kernel_width = self.kernel_size
        self.inputs.write(i, j, x)
        window = self.inputs.read(i + kernel_height - 1, 1, slice(j, j + kernel_width))  # (B, 1, kw, C_in)
        return F.linear(rearrange(window, "b 1 k c -> b (k c)"), self.weight_last)


class PointwiseAtPosition(Pointwise):
    """A gated resnet's 1x1 conv at one position: the bias is the row's part, as for RowSplitConv."""

    def start_row(self, i):
        return self.bias.float()[None, None]  # (1, 1, C_out)

    def at(self, i, j, x):
        return F.linear(x, self.weight[:, :, 0, 0])


def conv_at_position(layer: ShiftedConv, batch_size, shape):
    """A gated resnet's conv at one position: a 1x1 conv needs no memory of earlier positions;
    a k x k one keeps the rows of input it reads."""
    if layer.conv.kernel_size == (1, 1):
        return PointwiseAtPosition(layer.conv)
    return RowSplitConv(layer, batch_size, shape)


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
        batch_size = self.above.inputs.rows.shape[0]
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
        self.width = shape[1]

    def write(self, i, j, x):
        self.conv.write(i, j, x)

    def output_row(self, i):
        """(B, C, 1, W)."""
        if i == 0:
            return self.conv.bias.new_zeros(self.conv.inputs.rows.shape[0], len(self.conv.bias), 1, self.width)
        return self.conv.output_at(i - 1, None)


class RowGatedResBlock:
    """GatedResBlock.forward over row i, (B, C, 1, W) tensors: the vertical stream, computed a row
    at a time (dropout is off when sampling)."""

    def __init__(self, block: GatedResBlock, batch_size, shape):
        self.conv1 = ConvWindow(block.conv1, batch_size, shape)
        self.cond = None if block.cond is None else Pointwise(block.cond)
        self.conv2 = ConvWindow(block.conv2, batch_size, shape)

    def __call__(self, i, x, cond=None):
        h = self.conv1(i, None, F.elu(x))
        if self.cond is not None:
            h = h + self.cond(cond)
        return gate(x, self.conv2(i, None, F.elu(h)))


def column(part, j):
    """Column j of a row's part: (W, B, C), or (1, B, C) when it is the same for every column -> (B, C)."""
    return part[j if len(part) > 1 else 0]


class CachedGatedResBlock:
    """GatedResBlock.forward at one position, (B, C) tensors (dropout is off when sampling).

    `start_row` computes, for the whole row, every term of conv1's sum that does not depend on
    the row's own positions (the rows above, the bias, the condition, a vertical-stream aux) and
    conv2's rows above; a position then adds only the terms of its own row.
    """

    def __init__(self, block: GatedResBlock, batch_size, shape):
        self.conv1 = conv_at_position(block.conv1, batch_size, shape)
        self.aux = None if block.aux is None else Pointwise(block.aux)
        self.cond = None if block.cond is None else Pointwise(block.cond)
        self.conv2 = conv_at_position(block.conv2, batch_size, shape)
        self.row_h = self.row_out = None  # (W or 1, B, C) each, fp32: the row's parts of h and of conv2

    def start_row(self, i, aux_row=None, cond_row=None):
        """aux_row: the aux input over the row, (B, C_aux, 1, W), when it is known before the row
        (the vertical stream); cond_row: (B, D, 1, W) or (B, D, 1, 1)."""
        self.row_h = self.conv1.start_row(i)
        if aux_row is not None:
            self.row_h = self.row_h + row_major(self.aux(F.elu(aux_row)))
        if cond_row is not None:
            self.row_h = self.row_h + row_major(self.cond(cond_row))
        self.row_out = self.conv2.start_row(i)

    def __call__(self, i, j, x, aux=None):
        """x (B, C) -> (B, C); aux (B, C_aux): an aux input known only at the position (attention)."""
        h = self.conv1.at(i, j, F.elu(x)) + column(self.row_h, j)
        if aux is not None:
            h = h + self.aux(F.elu(aux))
        return gate(x, self.conv2.at(i, j, F.elu(h)) + column(self.row_out, j))


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

    def start_row(self, i, cond_row):
        for block in (self.kv_block, self.q_block):
            block.start_row(i)
        self.out_block.start_row(i, cond_row=cond_row)

    def __call__(self, i, j, h, background):
        self.features = h
        query = self.to_q(self.q_block(i, j, torch.cat([h, background], dim=1)))  # (B, C_k)
        attended = self.attend(query, i * self.width + j)
        return self.out_block(i, j, h, aux=attended)

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
    """A PixelSNAILBlock at one position. `start_row` prepares every gated resnet's row and, in a
    two-stream model, first computes the vertical stream over the whole row."""

    def __init__(self, block, batch_size, shape):
        self.res_blocks = [CachedGatedResBlock(res_block, batch_size, shape) for res_block in block.res_blocks]
        self.vertical = [] if block.vertical is None else [
            RowGatedResBlock(res_block, batch_size, shape) for res_block in block.vertical
        ]
        self.attention = None
        if block.attention is not None:
            self.attention = CachedAttention(block.attention, batch_size, shape)

    def start_row(self, i, vertical, cond_row):
        """Row i of the vertical stream entering the block, (B, C, 1, W) or None -> the one leaving it."""
        for index, res_block in enumerate(self.res_blocks):
            if self.vertical:
                vertical = self.vertical[index](i, vertical, cond=cond_row)
            res_block.start_row(i, aux_row=vertical if self.vertical else None, cond_row=cond_row)
        if self.attention is not None:
            self.attention.start_row(i, cond_row)
        return vertical

    def __call__(self, i, j, h, background):
        for res_block in self.res_blocks:
            h = res_block(i, j, h)
        if self.attention is not None:
            h = self.attention(i, j, h, background)
        return h


class IncrementalPixelSNAIL:
    """PixelSNAIL evaluated one position at a time in raster order: `output_at(i, j)`, draw, then
    `write(i, j, drawn)` before moving on. Takes a snapshot of the model's weights."""

    def __init__(self, model, batch_size, cond_map):
        shape = model.config.shape
        self.model = model
        self.background = model.background.expand(batch_size, -1, -1, -1)  # (B, 2, H, W)
        self.cond_map = cond_map  # (B, D, H, W), (B, D, 1, 1) (a class only) or None
        self.input = CachedInput(model.input, batch_size, shape)
        self.vertical_input = None
        if model.vertical_input is not None:
            self.vertical_input = CachedVerticalInput(model.vertical_input, batch_size, shape)
        self.blocks = [CachedBlock(block, batch_size, shape) for block in model.blocks]
        self.out_blocks = [CachedGatedResBlock(block, batch_size, shape) for block in model.out_blocks]
        self.head = Pointwise(model.head, autocast=False)

    def start_row(self, i):
        """Everything of row i that rows above it determine: rows above i are all written."""
        cond_row = None
        if self.cond_map is not None:  # (B, D, 1, W), or (B, D, 1, 1) for every column
            cond_row = self.cond_map if self.cond_map.shape[2] == 1 else self.cond_map[:, :, i : i + 1]
        vertical = None if self.vertical_input is None else self.vertical_input.output_row(i)
        for block in self.blocks:
            vertical = block.start_row(i, vertical, cond_row)
        for block in self.out_blocks:
            block.start_row(i, cond_row=cond_row)

    def output_at(self, i, j):
        """The network's output at (i, j), (B, P, 1, 1) as `model.draw` takes it, from the
        positions written so far."""
        if j == 0:
            self.start_row(i)
        background = self.background[:, :, i, j]  # (B, 2)
        h = self.input.output_at(i, j)  # (B, C)
        for block in self.blocks:
            h = block(i, j, h, background)
        for block in self.out_blocks:
            h = block(i, j, h)
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
