"""A lossless image codec driven by a pixel-space PixelSNAIL: the model's per-sub-pixel distributions
turned into a file by a range coder (constriction's, over 256-way categorical models).

Tiles and context. The model sees a fixed grid (its `shape`, S_h x S_w), so an image of any size is
coded as windows of that grid. The image is cut into `bands` horizontal bands, coded side by side;
inside a band, windows go top to bottom, each as wide as the grid. A band's first window codes all
its rows; every later one starts `context_rows` rows above the first row it codes, so its top rows
are pixels already coded (known, written into the network without coding) and the pixels it codes
see them as context, as they would inside a larger photo. A band's last window moves up to end on
the band's last row, taking more known rows. The part a window codes is its tile. A window that
reaches past the image's right edge is padded by repeating each row's last pixel (known to both
sides by then); rows past the band's end come after every pixel the window codes, so they are never
computed. Left context is not given: a tile's left neighbour is coded in the same pass.

Passes and batches. Pass k runs the k-th window of every band; its windows run through the cached
sampler (prior.sampling.IncrementalPixelSNAIL, `output_at` and `write` only) as batches of at most
`batch_limit`, in lock step over the grid's positions in raster order. At a position the network's
output gives each coded pixel's distribution; the values are coded R, then G given R, then B given
R and G (prior.mixture.PixelFactors: the likelihood's factors), each channel for all the
batch's tiles at once.

The same floats on both sides. Encoder and decoder run this one loop (`code_image`) and differ only
in their coder: the encoder codes the known value, the decoder decodes it. Everything that shapes
the floats is fixed by the file: the batches (from the header's layout), the thread count (the
header's; matmul kernels may split work by thread), fp32 without autocast, on the CPU. The header
holds a CRC-32 of each tile's pixels: a decoder whose floats differ (another model, another CPU
kind, another torch) fails on the first bad tile and writes nothing.
"""

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import constriction
import numpy as np
import torch
from einops import rearrange
from PIL import Image

from pipelines.data.datasets import DataError, to_model_range, to_rgb8
from pipelines.device import check_denormals_kept
from pipelines.errors import one_line
from pipelines.store.checkpoint import load_pixelsnail, resolve_checkpoint
from pipelines.store.codec_file import SUFFIX, Header, pack, tile_checksum, unpack
from pipelines.store.codes import file_sha256
from pipelines.store.outputs import check_output
from prior.mixture import PixelFactors
from prior.modes import evaluating
from prior.sampling import IncrementalPixelSNAIL

CONTEXT_SHARE = 8  # by default an eighth of each later window's rows are context: 4 of a 32-row grid
MIN_BATCH = 64  # bands are added until a pass holds this many windows (a smaller batch costs as much per step)
BATCH_LIMIT = 256  # windows per batch: bounds the sampler's caches (attention keys of every position)
CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


@dataclass(frozen=True)
class CodecModel:
    """A pixel model loaded for the codec, with the sha256 of its checkpoint file."""

    model: torch.nn.Module
    sha256: str


def load_codec_model(path) -> CodecModel:
    """A checkpoint (run directory or file) of an unconditional pixel-space PixelSNAIL, in fp32 on
    the CPU; refuses other models in one line."""
    model, _ = load_pixelsnail(path)
    config = model.config
    if not config.pixel_mode or config.conditioned:
        raise ValueError(f"--ckpt {path}: the codec needs an unconditional pixel-space PixelSNAIL, "
                         f"this one is {'class-conditional' if config.n_classes else 'a code-mode prior'}")
    return CodecModel(model.float().cpu().eval(), file_sha256(resolve_checkpoint(path)))


# -- layout: windows, tiles, passes, batches -----------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A grid-sized window of the image: top-left corner (top, left); its rows [0, first_new) are
    known, rows [first_new, rows) are its tile, coded here; `columns` of its columns are real pixels."""

    top: int
    left: int
    first_new: int
    rows: int
    columns: int

    def tile(self):
        """The tile's slices of the image: (rows, columns)."""
        return slice(self.top + self.first_new, self.top + self.rows), slice(self.left, self.left + self.columns)

    def describe(self):
        rows, columns = self.tile()
        return f"rows {rows.start}..{rows.stop - 1}, columns {columns.start}..{columns.stop - 1}"


def band_tops(start, stop, grid_rows, context_rows):
    """[(window top, first coded row)] of a band of image rows [start, stop), top to bottom."""
    tops, coded = [], start  # coded: the first row no window has coded yet
    while coded < stop:
        top = start if coded == start else max(start, min(coded - context_rows, stop - grid_rows))
        tops.append((top, coded - top))
        coded = min(top + grid_rows, stop)
    return tops


def default_bands(height, width, grid, context_rows):
    """Without context every window is independent: one band per grid of rows, all in one pass.
    With context, as few bands as give a pass MIN_BATCH windows: more bands cost context at each
    band's top, fewer leave a small batch, which costs nearly as much per step as a full one."""
    grid_rows, grid_columns = grid
    if context_rows == 0:
        return math.ceil(height / grid_rows)
    per_band = math.ceil(width / grid_columns)
    return max(1, min(math.ceil(MIN_BATCH / per_band), height // grid_rows))


def passes(height, width, grid, context_rows, bands):
    """The windows of each pass, [[Window]]: pass k holds the k-th window of every band, each band's
    windows left to right."""
    grid_rows, grid_columns = grid
    edges = [round(k * height / bands) for k in range(bands + 1)]
    lefts = range(0, width, grid_columns)
    columns = [min(grid_columns, width - left) for left in lefts]
    per_band = [band_tops(start, stop, grid_rows, context_rows) for start, stop in zip(edges, edges[1:])]
    layout = []
    for k in range(max(map(len, per_band))):
        layout.append([Window(band[k][0], left, band[k][1], min(grid_rows, stop - band[k][0]), count)
                       for band, stop in zip(per_band, edges[1:]) if k < len(band)
                       for left, count in zip(lefts, columns)])
    return layout


def batches(header: Header):
    """The batches the header's layout runs, [[Window]], in coding order."""
    layout = passes(header.height, header.width, header.tile, header.context_rows, header.bands)
    limit = header.batch_limit
    return [windows[k : k + limit] for windows in layout for k in range(0, len(windows), limit)]


def check_layout(header: Header, name):
    """Refuses a header whose layout cannot be coded (a damaged or foreign file), in one line."""
    (grid_rows, grid_columns), height, width = header.tile, header.height, header.width
    problems = [(height < 1 or width < 1, f"image size {height}x{width}"),
                (not 0 <= header.context_rows < grid_rows, f"{header.context_rows} context rows in {grid_rows}"),
                (not 1 <= header.bands <= height, f"{header.bands} bands"),
                (header.batch_limit < 1 or header.threads < 1, f"batch limit {header.batch_limit}, "
                                                                f"{header.threads} threads"),
                # a tile is at most a grid: fewer checksums than that cannot be right (and no layout is built)
                (math.ceil(height / grid_rows) * math.ceil(width / grid_columns) > len(header.checksums),
                 f"{len(header.checksums)} checksums for a {height}x{width} image")]
    for bad, what in problems:
        if bad:
            raise ValueError(f"{name} has a damaged header: {what}")
    n_tiles = sum(len(batch) for batch in batches(header))
    if n_tiles != len(header.checksums):
        raise ValueError(f"{name} has a damaged header: {len(header.checksums)} checksums for {n_tiles} tiles")


# -- the coding loop, shared by encoder and decoder ----------------------------------------------


class Encoder:
    """Codes the values it is given; counts their ideal code length, sum of -log2 p, in bits."""

    def __init__(self):
        self.coder = constriction.stream.queue.RangeEncoder()
        self.ideal_bits = 0.0

    def code(self, probabilities, values):
        """probabilities (n, 256) fp32, values (n,) -> the values."""
        self.coder.encode(values.astype(np.int32), CATEGORICAL, probabilities)
        self.ideal_bits -= np.log2(probabilities[np.arange(len(values)), values].astype(np.float64)).sum()
        return values

    def payload(self) -> bytes:
        return self.coder.get_compressed().astype("<u4").tobytes()


class PayloadError(ValueError):
    """The payload does not decode under the distributions the decoder computes."""


class Decoder:
    """Decodes the values from the payload, ignoring the placeholders it is given."""

    def __init__(self, payload: bytes):
        self.coder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))

    def code(self, probabilities, placeholders):
        try:
            return self.coder.decode(CATEGORICAL, probabilities)
        except AssertionError:  # constriction's way of saying the data do not fit the models
            raise PayloadError("the payload does not decode") from None


@contextmanager
def fixed_threads(threads):
    """torch's intra-op thread count set to `threads` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def code_pixel(params, values, coder):
    """Codes one pixel of each of n tiles, channel by channel: params (n, 10*M), values (n, 3) long
    (true values to the encoder, placeholders to the decoder) -> the coded values (n, 3)."""
    values, factors = values.clone(), PixelFactors(params)
    for channel in range(3):
        known = values.masked_fill(torch.arange(3) >= channel, 0)  # the same inputs on both sides
        probabilities = factors.distribution(to_model_range(known)).numpy()
        values[:, channel] = torch.from_numpy(coder.code(probabilities, values[:, channel].numpy()).astype(np.int64))
        factors.observe(values[:, channel])
    return values


def window_pixels(image, windows, grid):
    """The windows' pixels, uint8 (B, 3, S_h, S_w); past the image's edge, zeros."""
    pixels = torch.zeros(len(windows), 3, *grid, dtype=torch.uint8)
    for b, window in enumerate(windows):
        pixels[b, :, : window.rows, : window.columns] = image[:, window.top : window.top + window.rows,
                                                              window.left : window.left + window.columns]
    return pixels


@torch.no_grad()
def code_batch(model, windows, image, coder):
    """Runs one batch of windows through the cached network, coding each window's tile; the coded
    pixels land in `image` (3, H, W) uint8."""
    grid = model.config.shape
    pixels = window_pixels(image, windows, grid)  # (B, 3, S_h, S_w)
    first_new = torch.tensor([w.first_new for w in windows])
    rows, columns = torch.tensor([w.rows for w in windows]), torch.tensor([w.columns for w in windows])
    # the column a position repeats: itself inside the image, the row's last pixel past its right edge
    source_column = torch.minimum(torch.arange(grid[1])[None], columns[:, None] - 1)  # (B, S_w)
    i, j = torch.arange(grid[0])[:, None, None], torch.arange(grid[1])[None, :, None]
    coded = (first_new <= i) & (i < rows) & (j < columns)  # (S_h, S_w, B): the tiles' pixels
    # the windows coded at each raster position
    coded_at = [where.nonzero()[:, 0] for where in rearrange(coded, "h w b -> (h w) b")]
    last = max(k for k, who in enumerate(coded_at) if len(who))  # the raster positions after it are never read
    batch = torch.arange(len(windows))
    network = IncrementalPixelSNAIL(model, len(windows), None)
    for position in range(last + 1):
        i, j = divmod(position, grid[1])
        out = network.output_at(i, j)  # (B, 10*M, 1, 1)
        who = coded_at[position]
        if len(who):
            pixels[who, :, i, j] = code_pixel(out[who, :, 0, 0], pixels[who, :, i, j].long(), coder).to(torch.uint8)
        x = pixels[batch, :, i, source_column[:, j]]  # (B, 3)
        network.write(i, j, rearrange(to_model_range(x), "b c -> b c 1 1"))
    for b, window in enumerate(windows):
        image[:, window.tile()[0], window.tile()[1]] = pixels[b, :, window.first_new : window.rows, : window.columns]


def code_image(codec_model, header, image, coder, check=None):
    """The loop both sides run: every batch of the header's layout through `code_batch`; `check(k,
    window)` is called on each tile k once its batch is done."""
    model, k = codec_model.model, 0
    with fixed_threads(header.threads), evaluating(model), torch.autocast("cpu", enabled=False):
        check_denormals_kept("the codec")  # every file so far was coded with them: flushed, a tail's factors change
        for windows in batches(header):
            try:
                code_batch(model, windows, image, coder)
            except PayloadError as error:  # somewhere in this batch's tiles
                raise PayloadError(f"{error} in tiles {k}..{k + len(windows) - 1} (the batch from "
                                   f"{windows[0].describe()})") from None
            for window in windows:
                if check is not None:
                    check(k, window)
                k += 1


# -- encode and decode -------------------------------------------------------------------------


@dataclass
class Coded:
    """An encoded image: the file's bytes, its header, the ideal code length and the seconds taken."""

    data: bytes
    header: Header
    ideal_bits: float
    seconds: float

    @property
    def payload_bytes(self):
        return self.header.payload_bytes


def encode_image(codec_model, image, context_rows=None, bands=None, threads=None, batch_limit=BATCH_LIMIT) -> Coded:
    """uint8 (3, H, W) -> the .psnail file's bytes. `context_rows` None: a CONTEXT_SHARE of the
    grid's rows; `bands` None: `default_bands`; `threads` None: torch's current count."""
    start = time.perf_counter()
    _, height, width = image.shape
    grid = codec_model.model.config.shape
    context_rows = grid[0] // CONTEXT_SHARE if context_rows is None else context_rows
    if not 0 <= context_rows < grid[0]:
        raise ValueError(f"context rows must lie in [0, {grid[0]}) (the model's rows), got {context_rows}")
    bands = default_bands(height, width, grid, context_rows) if bands is None else bands
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    header = Header(codec_model.sha256, height, width, grid, context_rows, min(bands, height), batch_limit,
                    threads or torch.get_num_threads(), torch.__version__)
    encoder, checksums = Encoder(), []
    code_image(codec_model, header, image.clone(), encoder,
               check=lambda k, window: checksums.append(tile_checksum(image[:, window.tile()[0], window.tile()[1]])))
    payload = encoder.payload()
    header = replace(header, checksums=tuple(checksums), payload_bytes=len(payload))
    return Coded(pack(header, payload), header, encoder.ideal_bits, time.perf_counter() - start)


def read_header(data, name, codec_model) -> tuple[Header, bytes]:
    """A file's bytes -> (header, payload), refusing in one line a file that is not ours, damaged,
    or coded with another model."""
    header, payload = unpack(data, name)
    if header.model_sha256 != codec_model.sha256:
        raise ValueError(f"{name} was coded with another model (sha256 {header.model_sha256[:12]}...), not --ckpt's "
                         f"({codec_model.sha256[:12]}...): decode it with the model that coded it")
    if tuple(header.tile) != tuple(codec_model.model.config.shape):
        raise ValueError(f"{name} has a damaged header: tiles of {header.tile}, the model's grid is "
                         f"{codec_model.model.config.shape}")
    check_layout(header, name)
    return header, payload


def decode_image(codec_model, data, name) -> torch.Tensor:
    """A .psnail file's bytes -> uint8 (3, H, W), exactly the encoded image, or ValueError in one line
    naming `name` and the first tile whose pixels do not match their checksum."""
    header, payload = read_header(data, name, codec_model)
    image = torch.zeros(3, header.height, header.width, dtype=torch.uint8)
    other_torch = f" (it was coded under torch {header.torch_version}, this is {torch.__version__})" if (
        header.torch_version != torch.__version__) else ""
    why = f"the file is damaged or this machine computes other floats{other_torch}; no image written"

    def check(k, window):
        if tile_checksum(image[:, window.tile()[0], window.tile()[1]]) != header.checksums[k]:
            raise ValueError(f"{name}: tile {k} ({window.describe()}) does not decode to its checksum: {why}")

    try:
        code_image(codec_model, header, image, Decoder(payload), check)
    except PayloadError as error:
        raise ValueError(f"{name}: {error}: {why}") from None
    return image


# -- files -------------------------------------------------------------------------------------


def read_codec_image(file, convert=False) -> torch.Tensor:
    """An image file -> uint8 (3, H, W), its pixels as stored (no EXIF rotation). Anything but 8-bit
    RGB (grey, palette, alpha, 16 bits) is refused in one line, since the decoded PNG would not be
    the same image; `convert` codes it as pipelines.data.datasets.to_rgb8 makes it 8-bit RGB."""
    try:
        with Image.open(file) as image:
            mode = "16-bit RGB" if any("16" in raw_mode(tile.args) for tile in image.tile) else image.mode
            image.load()
            if mode != "RGB" and not convert:
                raise DataError(f"{file} is a {mode} image, not 8-bit RGB: the codec codes 8-bit RGB exactly; "
                                "--convert codes it as 8-bit RGB (grey to three channels, alpha over white, "
                                "16 bits to 8), which changes it")
            image = to_rgb8(image)
    except DataError:
        raise
    except Exception as error:  # PIL raises many types for truncated or foreign files
        raise DataError(f"cannot read image {file}: {one_line(error)}") from None
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def codec_files(paths) -> list[Path]:
    """The .psnail files that command-line arguments name: a file as given, a folder's .psnail
    files (sorted); a path that does not exist or a folder without any is refused in one line."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"file not found: {path}")
        found = sorted(path.glob(f"*{SUFFIX}")) if path.is_dir() else [path]
        if not found:
            raise ValueError(f"no {SUFFIX} files in {path}")
        files.extend(found)
    return files


def raw_mode(args) -> str:
    """The pixel layout a PIL decoder reads ('RGB;16B': 16-bit RGB, which PIL opens as 8-bit RGB)."""
    return str(args if isinstance(args, str) or not args else args[0])


def output_paths(inputs, out_dir, suffix, overwrite):
    """{input file: out_dir/<its stem><suffix>}, each checked before any work (outputs.check_output,
    an existing one refused unless `overwrite`); two inputs of one name are refused in one line."""
    targets, seen = {}, {}
    for file in map(Path, inputs):
        target = Path(out_dir) / (file.stem + suffix)
        if target in seen:
            raise ValueError(f"{seen[target]} and {file} would both be written as {target}: give them in two commands")
        seen[target] = file
        targets[file] = check_output(target, "--out", (suffix,), replace=overwrite, replace_flag="--overwrite")
    return targets
