"""Per-sample random numbers from a counter-based hash: the samplers' source of randomness.

A sampler draws at every position from uniforms. Where they come from decides what a sample
depends on. `SampleKeys` gives sample i a 64-bit key derived from (seed, i), and the uniforms of
sample i at (level, position, k) are a hash of (key, level, position, k) computed in integer
tensor ops: the whole batch in a constant number of device ops per position, no generator
state, and nothing that depends on the batch the sample is in, its place in it, or the process
that draws it. The guarantee, exactly: sample i's random numbers are a function of (seed, i)
(and the level and position) alone. Its codes are then identical in any batch wherever the
network's outputs for it are bitwise the same, which holds in fp32 on the CPU (tested); on a
GPU, kernels chosen per batch size may round an output differently and so flip a code at a near
tie.

The hash: 32-bit values held in int64 tensors, mixed by xor-shifts and multiplications by odd
constants below 2**31 (a 32-bit value times one fits in int64 without overflow, so every device
computes the same bits), as in the finalisers of MurmurHash-style hashes. A uniform keeps 23 bits
of its hash: (x + 0.5) / 2**23 lies strictly inside (0, 1) and is exact in fp32, so log(u) and
log(-log(u)) are finite.

A torch.Generator (or None) instead draws the batch's uniforms with torch.rand: reproducible for
one batch, but sample i's numbers then depend on the batch.
"""

import hashlib
import zlib

import torch
from torch import Tensor

MASK = 0xFFFFFFFF
MULTIPLIERS = (0x7FEB352D, 0x5BD1E995)  # odd, < 2**31
UNIFORM_BITS = 23
CHUNK = 32  # host positions: the uniforms of this many consecutive positions come from one hash


def mix(x: Tensor) -> Tensor:
    """A 32-bit hash of each 32-bit value of x (int64): same shape."""
    x = x ^ (x >> 16)
    x = (x * MULTIPLIERS[0]) & MASK
    x = x ^ (x >> 15)
    x = (x * MULTIPLIERS[1]) & MASK
    return x ^ (x >> 16)


def sample_key(seed: int, index: int) -> tuple[int, int]:
    """Sample `index`'s key under `seed`: two 32-bit words of a hash of (seed, index)."""
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


class SampleKeys:
    """The keys of a batch of samples, (B, 2) int64, and the level they draw at."""

    def __init__(self, words: Tensor, level: int = 0):
        self.words = words
        self.level = level
        self.chunk = (None, None)  # ((first position, count), (B, CHUNK, count) uniforms) last hashed

    @classmethod
    def of(cls, seed, indices, device="cpu"):
        """The keys of samples `indices` under `seed`."""
        words = [sample_key(seed, int(index)) for index in indices]
        return cls(torch.tensor(words, dtype=torch.int64, device=device).view(-1, 2))

    def at_level(self, name: str) -> "SampleKeys":
        """The same samples drawing at another level (the top and the bottom prior)."""
        return SampleKeys(self.words, zlib.crc32(name.encode()))

    def __len__(self):
        return len(self.words)

    def uniform(self, position, count: int) -> Tensor:
        """(B, count) fp32 uniforms in (0, 1) at raster `position` (an int or a 0-dim tensor).

        A 0-dim tensor (a compiled or captured step) is hashed alone. An int, as a sampler walks the
        positions in order, is looked up in the chunk of CHUNK positions it lies in, hashed in one
        go when first asked for: the same numbers, in a few ops per chunk instead of ~25 per position."""
        if not isinstance(position, int):
            return self.hashed(position.view(1), count)[:, 0]
        first = position - position % CHUNK
        (key, chunk) = self.chunk
        if key != (first, count):
            chunk = self.hashed(torch.arange(first, first + CHUNK, device=self.words.device), count)
            self.chunk = ((first, count), chunk)
        return chunk[:, position - first]

    def hashed(self, positions: Tensor, count: int) -> Tensor:
        """(P,) raster positions -> (B, P, count) fp32 uniforms in (0, 1), each a function of the
        sample's key, the level, its position and its index k < count alone."""
        state = mix(positions ^ self.level)  # (P,)
        state = mix(state ^ self.words[:, :1])  # (B, P)
        state = mix(state ^ self.words[:, 1:])
        counters = torch.arange(count, device=self.words.device)  # (count,)
        bits = mix(mix(state[:, :, None] ^ counters)) >> (32 - UNIFORM_BITS)  # (B, P, count)
        return (bits.float() + 0.5) * 2.0**-UNIFORM_BITS


def uniforms(generator, position, batch_size: int, count: int, device) -> Tensor:
    """(B, count) uniforms in (0, 1) for one position: from per-sample keys, or from a torch
    generator (None: torch's default one) for the whole batch."""
    if isinstance(generator, SampleKeys):
        if len(generator) != batch_size:
            raise ValueError(f"{len(generator)} sample keys for a batch of {batch_size}")
        return generator.uniform(position, count)
    return torch.rand((batch_size, count), generator=generator, device=device).clamp_(min=2.0**-24)


def at_level(generator, name: str):
    """Per-sample keys at level `name`; a torch generator (or None) as it is."""
    return generator.at_level(name) if isinstance(generator, SampleKeys) else generator
