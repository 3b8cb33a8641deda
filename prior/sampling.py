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
from prior.noise import SampleKeys


def as_autocast(tensor):
    """`tensor` in the dtype autocast would give it at every call, cast once: the sampler uses each
    weight at every position, and under bf16 autocast a cast of every weight at every step costs
    more than the step's arithmetic (the same values either way)."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return tensor.to(torch.get_autocast_dtype(device))
    return tensor


# A position's row and column are host ints in an eager step, and 0-dim device tensors in a static
# one (compiled or captured: the same ops at every position, no transfer to the host). The index
# ops below take either: an int costs a view or nothing, where a tensor needs index arithmetic.


def at_index(tensor, dim, index):
    """The entry `index` of `dim`, the dim kept (size 1): a view for an int, an index_select for a tensor."""
    if isinstance(index, int):
        return tensor.narrow(dim, index, 1)
    return tensor.index_select(dim, index.view(1))


def entry(tensor, index):
    """tensor[index] along dim 0: a view for an int, an index_select for a tensor."""
    return tensor[index] if isinstance(index, int) else tensor.index_select(0, index.view(1))[0]


def put(buffer, dim, index, value):
    """Writes `value` (size 1 along `dim`) into `buffer` at `index` of `dim`, in place."""
    if isinstance(index, int):
        buffer.narrow(dim, index, 1).copy_(value)
    else:
        buffer.index_copy_(dim, index.view(1), value)


def zero_unless(condition, x):
    """`x` where `condition` (a bool, or a 0-dim bool tensor) holds, zeros elsewhere."""
    if isinstance(condition, bool):
        return x if condition else torch.zeros_like(x)
    return torch.where(condition, x, 0)


def nonnegative(index):
    return max(index, 0) if isinstance(index, int) else index.clamp(min=0)


class Pointwise:
    """A 1x1 conv at one position, (B, C_in) -> (B, C_out), or over a row, (B, C_in, 1, W) ->
    (B, C_out, 1, W). It reads no other position. `autocast=False` keeps the weights' own
    precision (the head runs in fp32)."""

    def __init__(self, conv: WNConv2d, autocast=True):
        cast = as_autocast if autocast else (lambda tensor: tensor)
        self.weight = cast(conv.weight)  # (C_out, C_in, 1, 1), the weight-normalised weight
        self.matrix = self.weight[:, :, 0, 0]  # (C_out, C_in), the same numbers: not re-selected at every step
        self.bias = cast(conv.bias)

    def __call__(self, x):
        if x.dim() == 4:
            return F.conv2d(x, self.weight, self.bias)
        return F.linear(x, self.matrix, self.bias)


class PaddedRows:
    """The last rows of a conv's input grid, zero-padded exactly as ShiftedConv pads it.

    A conv reads at most its kernel's height of rows while the row being written may lie one
    past them, so kh + 1 padded rows are kept, in a ring (padded row r in slot r mod (kh + 1)):
    memory does not grow with the grid's height. A slot reused for a new row still holds an old
    row's values in the columns not yet written, which a causal conv never reads. Channels
    last, (B, kh + 1, W + pads, C_in). Rows and columns are host ints (eager: views and index
    tables made once) or 0-dim device tensors (static: index ops, the same at every position, what
    a captured graph needs).
    """

    def __init__(self, layer: ShiftedConv, batch_size, width, dtype):
        left, right, top, _ = layer.padding
        self.top, self.left, self.width = top, left, width
        self.n_slots = layer.conv.kernel_size[0] + 1
        self.padded_width = left + width + right
        device = layer.conv.bias.device
        self.rows = torch.zeros(batch_size, self.n_slots, self.padded_width, layer.conv.in_channels, dtype=dtype,
                                device=device)
        self.cells = self.rows.view(batch_size, self.n_slots * self.padded_width, -1)  # a cell per (slot, column)
        self.offsets = torch.arange(max(self.n_slots, self.padded_width), device=device)
        self.tables = {}  # host positions: index tensors made once, by (first slot, count[, kernel width])

    def slots(self, start, count):
        """(count,): the slots of padded rows start..start+count-1."""
        return (start + self.offsets[:count]) % self.n_slots

    def write(self, i, j, x):
        """Stores the input at (i, j), x (B, C_in); or over row i (j=None), x (B, C_in, 1, W)."""
        first = (self.top + i) % self.n_slots * self.padded_width + self.left  # the cell of row i's column 0
        if j is None:
            self.cells.index_copy_(1, first + self.offsets[: self.width], rearrange(x, "b c 1 w -> b w c").to(self.rows))
        else:
            put(self.cells, 1, first + j, x[:, None].to(self.rows))

    def window_cells(self, start, count, columns, kernel_width):
        """(..., count*kw): the cells of the windows of padded rows start..start+count-1 whose first
        column is `columns` (an int, a 0-dim tensor or a (W, 1) tensor)."""
        cells = self.slots(start, count)[:, None] * self.padded_width + self.offsets[None, :kernel_width]  # (count, kw)
        return cells.flatten() + columns

    def window(self, start, count, j, kernel_width):
        """The window of padded rows start..start+count-1, columns j..j+kw-1, as (B, count*kw*C_in).
        At a host position its cells are a row of a table made once for every column, (W, count*kw)."""
        if isinstance(start, int):
            key = (start % self.n_slots, count, kernel_width)
            if key not in self.tables:
                self.tables[key] = self.window_cells(key[0], count, self.offsets[: self.width, None], kernel_width)
            cells = self.tables[key][j]
        else:
            cells = self.window_cells(start, count, j, kernel_width)
        return rearrange(self.cells.index_select(1, cells), "b n c -> b (n c)")

    def row_windows(self, start, count, kernel_width):
        """The windows of padded rows start..start+count-1 under every output column of a row, as
        one matrix (W*B, count*kw*C_in): a conv over the row is then one large matmul."""
        if isinstance(start, int):
            key = (start % self.n_slots, count)
            if key not in self.tables:
                self.tables[key] = self.slots(*key)
            slots = self.tables[key]
        else:
            slots = self.slots(start, count)
        windows = self.rows.index_select(1, slots).unfold(2, kernel_width, 1)  # (B, count, W, C_in, kw)
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
        return F.linear(self.inputs.window(i, kernel_height, j, kernel_width), self.weight, self.bias)

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
        return F.linear(self.inputs.window(i + kernel_height - 1, 1, j, kernel_width), self.weight_last)


class PointwiseAtPosition(Pointwise):
    """A gated resnet's 1x1 conv at one position: the bias is the row's part, as for RowSplitConv."""

    def start_row(self, i):
        return self.bias.float()[None, None]  # (1, 1, C_out)

    def at(self, i, j, x):
        return F.linear(x, self.matrix)


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
        row and the left column: both convs run everywhere, their outputs there masked."""
        above = self.above.output_at(i - 1, j)
        left = self.left.output_at(i, nonnegative(j - 1))
        return zero_unless(i > 0, above) + zero_unless(j > 0, left)


class CachedVerticalInput:
    """VerticalInput over a row: row i is the conv's output at row i - 1 (zeros at row 0), so it
    reads raw inputs of rows above i only, all written before row i starts."""

    def __init__(self, layer: VerticalInput, batch_size, shape):
        self.conv = ConvWindow(layer.conv, batch_size, shape)

    def write(self, i, j, x):
        self.conv.write(i, j, x)

    def output_row(self, i):
        """(B, C, 1, W)."""
        return zero_unless(i > 0, self.conv.output_at(i - 1, None))


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
    return entry(part, j) if len(part) > 1 else part[0]


def kept(buffer, value):
    """`value` stored in `buffer` (made on the first call): a row's parts stay at one address, which
    a captured step reads."""
    if buffer is None:
        return value.clone()
    return buffer.copy_(value)


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
        row_h = self.conv1.start_row(i)
        if aux_row is not None:
            row_h = row_h + row_major(self.aux(F.elu(aux_row)))
        if cond_row is not None:
            row_h = row_h + row_major(self.cond(cond_row))
        self.row_h = kept(self.row_h, row_h)
        self.row_out = kept(self.row_out, self.conv2.start_row(i))

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
    causal_attention lets it see. At a host position (eager) it reads just those slots; at a
    device position (static) all N slots, the later ones masked: one shape at every position.
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
        self.key_positions = torch.arange(n_positions, device=self.keys.device)
        self.everywhere = torch.ones(1, n_positions, dtype=torch.bool, device=self.keys.device)
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
        q = rearrange(query, "b (h d) -> b h 1 d", h=self.n_heads).to(self.keys.dtype)
        # key 0 always: a query with no key at all would get NaN; position 0's output is zeroed below
        if isinstance(position, int):  # the slots written so far, all visible: fewer FLOPs early on
            n_read = max(position, 1)
            keys, values, visible = self.keys[:, :, :n_read], self.values[:, :, :n_read], self.everywhere[:, :n_read]
        else:
            keys, values = self.keys, self.values
            visible = ((self.key_positions < position) | (self.key_positions == 0))[None]  # (1, N): one query
        # in the cache's precision: under autocast every step would copy all keys and values to bf16
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)  # (B, heads, 1, d_v)
        return zero_unless(position > 0, rearrange(out, "b h 1 d -> b (h d)"))

    def write(self, i, j, raw, background):
        """Adds the key and value of drawn position (i, j), from its raw input (B, C_in)."""
        key_value = self.to_kv(self.kv_block(i, j, torch.cat([raw, self.features, background], dim=1)))
        key, value = key_value[:, : self.key_channels], key_value[:, self.key_channels :]
        position = i * self.width + j
        put(self.keys, 2, position, rearrange(key, "b (h d) -> b h 1 d", h=self.n_heads).to(self.keys))
        put(self.values, 2, position, rearrange(value, "b (h d) -> b h 1 d", h=self.n_heads).to(self.values))


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
    `write(i, j, drawn)` before moving on. Takes a snapshot of the model's weights.

    `static`: the position lives on the device (`position`, a 0-dim tensor) and every cache is
    allocated up front: `start_row()`, `output()` and `feed(drawn)` run the same ops on tensors of
    the same shapes at every position, with no transfer to the host, so that each can be compiled
    (torch.compile(fullgraph=True)) or captured once as a CUDA graph and replayed everywhere.
    Eager (the default), the same code indexes by the host position `at` set: views instead of
    index arithmetic on the device, and the attention reads only the key slots written so far,
    fewer ops per step. `output_at` and `write` set the position from the host first."""

    def __init__(self, model, batch_size, cond_map, static=False):
        shape = model.config.shape
        self.model = model
        self.static = static  # positions as device tensors, every step in one shape
        self.width = shape[1]
        self.batch_size = batch_size
        self.background = rearrange(model.background, "1 c h w -> (h w) c")  # (N, 2)
        self.cond_map = cond_map  # (B, D, H, W), (B, D, 1, 1) (a class only) or None
        self.input = CachedInput(model.input, batch_size, shape)
        self.vertical_input = None
        if model.vertical_input is not None:
            self.vertical_input = CachedVerticalInput(model.vertical_input, batch_size, shape)
        self.blocks = [CachedBlock(block, batch_size, shape) for block in model.blocks]
        self.out_blocks = [CachedGatedResBlock(block, batch_size, shape) for block in model.out_blocks]
        self.head = Pointwise(model.head, autocast=False)
        self.position = torch.zeros((), dtype=torch.long, device=model.background.device)  # raster position
        self.host_position = (0, 0)  # (i, j), what an eager step indexes by

    def at(self, i, j):
        """Moves to position (i, j) (a fill from the host: no synchronisation)."""
        self.position.fill_(i * self.width + j)
        self.host_position = (int(i), int(j))

    def row_and_column(self):
        """(i, j) of the current position: 0-dim device tensors if static, else host ints."""
        if not self.static:
            return self.host_position
        i = torch.div(self.position, self.width, rounding_mode="floor")
        return i, self.position - i * self.width

    def raster_position(self):
        """The current raster position: the 0-dim device tensor if static, else a host int."""
        if not self.static:
            i, j = self.host_position
            return i * self.width + j
        return self.position

    def background_here(self):
        return at_index(self.background, 0, self.raster_position()).expand(self.batch_size, -1)  # (B, 2)

    def start_row(self):
        """Everything of the current row that rows above it determine: rows above are all written."""
        i, _ = self.row_and_column()
        cond_row = None
        if self.cond_map is not None:  # (B, D, 1, W), or (B, D, 1, 1) for every column
            cond_row = self.cond_map if self.cond_map.shape[2] == 1 else at_index(self.cond_map, 2, i)
        vertical = None if self.vertical_input is None else self.vertical_input.output_row(i)
        for block in self.blocks:
            vertical = block.start_row(i, vertical, cond_row)
        for block in self.out_blocks:
            block.start_row(i, cond_row=cond_row)

    def output(self):
        """The network's output at the current position, (B, P, 1, 1) as `model.draw` takes it,
        from the positions written so far (after `start_row` at the row's first position)."""
        i, j = self.row_and_column()
        background = self.background_here()
        h = self.input.output_at(i, j)  # (B, C)
        for block in self.blocks:
            h = block(i, j, h, background)
        for block in self.out_blocks:
            h = block(i, j, h)
        with torch.autocast(h.device.type, enabled=False):  # in fp32, as PixelSNAIL.output
            out = self.head(F.elu(h.to(self.model.head.bias.dtype)))
        return rearrange(out, "b p -> b p 1 1")

    def feed(self, drawn):
        """Feeds the values drawn at the current position back in: (B, 3, 1, 1) pixels or (B, 1, 1) codes."""
        i, j = self.row_and_column()
        raw = self.model.raw_input(drawn)[:, :, 0, 0]  # (B, C_in)
        inputs = torch.cat([raw, torch.ones_like(raw[:, :1])], dim=1)
        self.input.write(i, j, inputs)
        if self.vertical_input is not None:
            self.vertical_input.write(i, j, inputs)
        background = self.background_here()
        for block in self.blocks:
            if block.attention is not None:
                block.attention.write(i, j, raw, background)

    def output_at(self, i, j):
        """The network's output at (i, j), (B, P, 1, 1): `output()` there, the row started at j = 0."""
        self.at(i, j)
        if j == 0:
            self.start_row()
        return self.output()

    def write(self, i, j, drawn):
        """`feed(drawn)` at (i, j)."""
        self.at(i, j)
        self.feed(drawn)


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

    def draw(self, model, out, generator, position):
        """The network's output at one position, (batch_size, P, 1, 1) -> the n values drawn there."""
        if self.drawing.guided:
            out = guide(out, self.drawing.guidance)
        return model.draw(out, generator, self.drawing, position)

    def store(self, drawn, position):
        """Writes the values drawn at raster `position` (an int, or a 0-dim tensor: an index op) into the grid."""
        put(self.x.flatten(-2), -1, position, drawn[..., None].to(self.x))


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
    x, width = job.x, model.config.shape[1]
    with evaluating(model):
        for i, j in raster_order(model.config.shape, progress, job.kept):
            out = model(job.network_input(x), job.label, job.cond)[:, :, i : i + 1, j : j + 1]
            x[..., i, j] = job.draw(model, out, generator, i * width + j)
    return x


class CachedSteps:
    """The cached sampler's two kinds of work, on the device position of `network`: `start_row()`
    at a row's first position, then `step()`: the output, the draw, the values written into the
    grid and fed back, the position advanced. With `capture`, each is captured as a CUDA graph the
    first time it is needed and replayed from then on: one graph each per level, for every position."""

    def __init__(self, model, job, network, generator, capture=False):
        self.model, self.job, self.network, self.generator = model, job, network, generator
        self.start_row, self.step = self.eager_start_row, self.eager_step
        if capture:
            if network.position.device.type != "cuda":
                raise ValueError("capturing the sampling steps as CUDA graphs needs CUDA (--capture on a GPU)")
            if not isinstance(generator, SampleKeys):
                raise ValueError("a captured step draws from per-sample keys (prior.noise.SampleKeys), not a generator")
            self.start_row = lambda: self.captured("start_row", self.eager_start_row)()
            self.step = lambda: self.captured("step", self.eager_step)()

    def eager_start_row(self):
        self.network.start_row()

    def eager_step(self):
        network, job = self.network, self.job
        position = network.raster_position()
        drawn = job.draw(self.model, network.output(), self.generator, position)  # (n, 3) or (n,)
        job.store(drawn, position)
        network.feed(job.network_input(drawn[..., None, None]))
        network.position.add_(1)

    def captured(self, name, work):
        """`work` as a CUDA graph's replay, captured on the first call (after one warm-up run on a side
        stream, as capture needs; the position is then set back, so the warm-up's writes are redone)."""
        replay = self.__dict__.get(f"{name}_replay")
        if replay is None:
            position = self.network.position.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                work()
            torch.cuda.current_stream().wait_stream(side)
            self.network.position.copy_(position)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                work()
            self.network.position.copy_(position)
            replay = self.__dict__[f"{name}_replay"] = graph.replay
        return replay


@torch.no_grad()
def sample_cached(model, n, label=None, cond=None, generator=None, temperature=1.0, progress=False, *,
                  prefix=None, kept=0, top_k=None, top_p=None, guidance=None, capture=False) -> Tensor:
    """n samples in raster order, (n, 3, H, W) in [-1, 1] or (n, H, W) codes: exactly what
    `sample_naive` returns for the same arguments and generator state, computing one new
    position per step instead of the whole grid.

    `prefix`, `kept`: the first `kept` raster positions are `prefix`'s (returned unchanged; fed
    through the caches without drawing), sampling starts after them. `top_k`, `top_p`,
    `guidance`: see prior.drawing; under guidance the conditional and the null-class batch run
    as one batch of 2n. `capture`: replay each step as a CUDA graph (CachedSteps; CUDA and
    per-sample keys only).
    """
    job = start_job(model, n, label, cond, prefix, kept, Drawing(temperature, top_k, top_p, guidance))
    x, shape = job.x, model.config.shape
    with evaluating(model):
        condition = model.condition(job.batch_size, job.label, job.cond)
        network = IncrementalPixelSNAIL(model, job.batch_size, condition, static=capture)
        for i, j in itertools.islice(raster_order(shape), job.kept):
            network.output_at(i, j)  # fills the layers' caches at (i, j)
            network.write(i, j, job.network_input(x[..., i : i + 1, j : j + 1]))
        steps = CachedSteps(model, job, network, generator, capture)
        for i, j in raster_order(shape, progress, job.kept):
            network.at(i, j)  # where the step advanced it to; eager, its host position too
            if j == 0:
                steps.start_row()
            steps.step()
    return x
