"""The `.psnail` file of the lossless image codec (pipelines.infer.codec): a header, then the payload.

All integers are little-endian. The header:

    magic           8 bytes   b"PSNAIL\\r\\n" (a file of another format fails at once)
    format_version  u16       FORMAT_VERSION; a newer one is refused
    model_sha256    32 bytes  the sha256 of the model's checkpoint file
    height, width   u32 x 2   the image, in pixels
    tile            u16 x 2   a window's rows and columns: the model's grid
    context_rows    u16       rows of already-coded pixels above each window after a band's first
    bands           u16       horizontal bands coded side by side (see pipelines.infer.codec)
    batch_limit     u16       at most this many windows run through the network as one batch
    threads         u16       torch's intra-op threads while coding: decoding uses the same number
    payload_bytes   u64       the payload's length
    n_tiles         u32       how many tiles, and so checksums, follow
    torch_version   u8 n + n bytes (ASCII)
    checksums       u32 per tile, in coding order: CRC-32 of the tile's decoded pixels

The tiles, the windows and the batches all follow from these fields, so decoding runs exactly the
batches encoding ran. The payload is the range coder's stream of 32-bit words.
"""

import struct
import zlib
from dataclasses import dataclass, replace

MAGIC = b"PSNAIL\r\n"  # the \r\n catches a file mangled by a text-mode transfer
FORMAT_VERSION = 1
SUFFIX = ".psnail"
FIXED = struct.Struct("<8sH32sIIHHHHHHQI")  # magic .. n_tiles
CHECKSUM = struct.Struct("<I")


@dataclass(frozen=True)
class Header:
    model_sha256: str  # hex
    height: int
    width: int
    tile: tuple[int, int]
    context_rows: int
    bands: int
    batch_limit: int
    threads: int
    torch_version: str
    checksums: tuple[int, ...] = ()
    payload_bytes: int = 0

    @property
    def size(self) -> int:
        """The header's bytes: FIXED.size + 1 + the torch version + 4 per tile."""
        return FIXED.size + 1 + len(self.torch_version.encode("ascii")) + CHECKSUM.size * len(self.checksums)


def tile_checksum(pixels) -> int:
    """CRC-32 of a tile's pixels, uint8 (3, h, w), in C order."""
    return zlib.crc32(pixels.contiguous().numpy().tobytes())


def pack(header: Header, payload: bytes) -> bytes:
    """The file's bytes: the header (its payload_bytes set from the payload), then the payload."""
    version = header.torch_version.encode("ascii")
    fixed = FIXED.pack(MAGIC, FORMAT_VERSION, bytes.fromhex(header.model_sha256), header.height, header.width,
                       *header.tile, header.context_rows, header.bands, header.batch_limit, header.threads,
                       len(payload), len(header.checksums))
    checksums = b"".join(CHECKSUM.pack(value) for value in header.checksums)
    return fixed + bytes([len(version)]) + version + checksums + payload


def unpack(data: bytes, name) -> tuple[Header, bytes]:
    """A file's bytes -> (header, payload); ValueError in one line naming the file `name` when it is
    not a .psnail file, is newer than this code, or is truncated or too long."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{name} is not a {SUFFIX} file (it does not start with {MAGIC!r})")
    if len(data) < FIXED.size + 1:
        raise ValueError(f"{name} is truncated: {len(data)} bytes, shorter than the header")
    _, version, digest, height, width, tile_h, tile_w, context_rows, bands, batch_limit, threads, payload_bytes, \
        n_tiles = FIXED.unpack_from(data)
    if payload_bytes % 4:
        raise ValueError(f"{name} has a damaged header: a payload of {payload_bytes} bytes, not whole 32-bit words")
    if version > FORMAT_VERSION:
        raise ValueError(f"{name} has format version {version}, newer than this code reads ({FORMAT_VERSION}): "
                         "update the code")
    start = FIXED.size + 1
    torch_version = data[start : start + data[FIXED.size]].decode("ascii", errors="replace")
    header = Header(digest.hex(), height, width, (tile_h, tile_w), context_rows, bands, batch_limit, threads,
                    torch_version, payload_bytes=payload_bytes)
    start += data[FIXED.size]
    expected = start + CHECKSUM.size * n_tiles + payload_bytes
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(f"{name} is {problem}: {len(data)} bytes where its header makes {expected}")
    end = start + CHECKSUM.size * n_tiles
    checksums = tuple(value for (value,) in CHECKSUM.iter_unpack(data[start:end]))
    return replace(header, checksums=checksums), data[end:]
