"""What a prior was trained on: its level and its code database's VQ-VAE, grids and codebooks,
stored in the prior's checkpoint and checked against the VQ-VAE it is sampled with, and the
database's identity, which tells evaluation whether a database is the one the prior trained on."""

import hashlib
import json
from dataclasses import dataclass

from modelkit import level_names
from pipelines.store.checkpoint import CheckpointError
from pipelines.store.codes import TWO_LEVELS, level_grids

# ------------------------------------------------------------------------------------------------
# What a prior was trained on


def database_identity(metadata: dict) -> str:
    """A code database's identity: the SHA-256 of its metadata (its VQ-VAE, grids, codebooks, the data
    and split it encodes, its record count). A copy or a moved database keeps it; another database
    of the same VQ-VAE (another split, other images) has another."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class PriorProvenance:
    """What a prior was trained on: its level and the code database's VQ-VAE (file hash), image size,
    grids, codebooks and classes, and the database's identity. The prior trainer writes it into the
    checkpoint's metadata (`to_extra`); generation reads it back (`from_extra`) and checks it
    against its VQ-VAE, evaluation against the database it is given.

    The top (first) and bottom (last) grids are fields of their own, as they were when every
    database had two levels; `inner` holds the levels between them, so that two-level records are
    built, stored and read exactly as before."""

    level: str  # its name in modelkit.level_names(self.levels): top, middle, bottom, or level0 ...
    vqvae_sha256: str
    image_size: int
    top_shape: tuple[int, int]
    bottom_shape: tuple[int, int]
    top_codes: int
    bottom_codes: int
    n_classes: int
    database: str | None = None  # database_identity; None where unknown (a prior from before it was stored)
    inner: tuple[tuple[tuple[int, int], int], ...] = ()  # (grid shape, codebook size) of each inner level, top first

    @property
    def grids(self) -> tuple[tuple[tuple[int, int], int], ...]:
        """(grid shape, codebook size) of every level of the database, top first."""
        return ((self.top_shape, self.top_codes), *self.inner, (self.bottom_shape, self.bottom_codes))

    @property
    def levels(self) -> int:
        """How many levels the database holds."""
        return len(self.grids)

    @property
    def index(self) -> int:
        """The prior's level as an index: 0 for the top, levels - 1 for the bottom."""
        return level_names(self.levels).index(self.level)

    @classmethod
    def of_database(cls, metadata: dict, level: str) -> "PriorProvenance":
        return cls._of_fields(metadata, level, database_identity(metadata))

    @classmethod
    def _of_fields(cls, fields: dict, level: str, database: str | None) -> "PriorProvenance":
        """From a layout (a database's metadata, or the record a checkpoint keeps of it); KeyError or
        TypeError where a field is missing or malformed, ValueError where `level` is not one of its."""
        grids = [(shape, codes) for _, shape, codes in level_grids(fields)]
        names = level_names(len(grids))
        if level not in names:
            raise ValueError(f"level {level!r} is not one of the database's {len(grids)} levels ({', '.join(names)})")
        (top_shape, top_codes), *inner, (bottom_shape, bottom_codes) = grids
        job = {name: fields[name] for name in JOB_FIELDS}
        return cls(level, job["vqvae_sha256"], job["image_size"], top_shape, bottom_shape, top_codes, bottom_codes,
                   job["n_classes"], database, tuple(inner))

    def layout(self) -> dict:
        """The database's fields in its own metadata's names: `levels` (left out for two levels, as
        databases do), each level's `<name>_shape` and `<name>_codes`, and the VQ-VAE's."""
        counted = {} if self.levels == TWO_LEVELS else {"levels": self.levels}
        grids = {}
        for name, (shape, codes) in zip(level_names(self.levels), self.grids):
            grids.update({f"{name}_shape": shape, f"{name}_codes": codes})
        return {**counted, **grids, **{name: getattr(self, name) for name in JOB_FIELDS}}

    def to_extra(self) -> dict:
        """As a checkpoint's extra metadata: {"level": ..., "codes": {the database's fields, its identity}}."""
        return {"level": self.level, "codes": {**self.layout(), "database": self.database}}

    @classmethod
    def from_extra(cls, extra: dict, path) -> "PriorProvenance":
        """From a checkpoint's extra metadata; CheckpointError naming `path` if it holds none."""
        codes = extra.get("codes")
        if not isinstance(extra.get("level"), str) or not isinstance(codes, dict):
            raise CheckpointError(f"{path} does not record the code database it was trained on")
        try:
            return cls._of_fields(codes, extra["level"], codes.get("database"))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path} has a damaged record of its code database ({error!r})") from None

    def same_database(self, other: "PriorProvenance") -> bool:
        """Whether `other` (of a code database) describes the database this prior trained on, by their
        identities; a prior that stored none (from before it was kept) is taken at its word."""
        return self.database is None or self.database == other.database


JOB_FIELDS = ("vqvae_sha256", "image_size", "n_classes")  # what a prior records of the job besides the grids


def prior_fields(record: PriorProvenance) -> dict:
    """The PixelSNAILConfig fields that a code database (or a VQ-VAE, described by the same record)
    fixes for a prior of the record's level: its grid and codebook, and every level below the top
    conditioned on the grid of the level above it."""
    shape, n_codes = record.grids[record.index]
    fields = {
        "shape": shape,
        "n_codes": n_codes,
        "n_classes": record.n_classes if record.n_classes > 1 else 0,  # one class: no condition
        "cond_codes": None,
        "cond_shape": None,
    }
    if record.index > 0:
        cond_shape, cond_codes = record.grids[record.index - 1]
        fields.update(cond_codes=cond_codes, cond_shape=cond_shape)
    return fields


def check_fits(config, record: PriorProvenance, what: str) -> None:
    """Raises ValueError, naming both values, where a prior's config does not fit `what` (a code
    database or a VQ-VAE, described by `record`)."""
    for name, expected in prior_fields(record).items():
        actual = getattr(config, name)
        if actual != expected:
            raise ValueError(f"the {record.level} prior has {name}={actual} but {what} has {expected}")
