"""What a prior was trained on: its level and its code database's VQ-VAE, grids and codebooks,
stored in the prior's checkpoint and checked against the VQ-VAE it is sampled with, and the
database's identity, which tells evaluation whether a database is the one the prior trained on."""

import hashlib
import json
from dataclasses import dataclass

from modelkit import level_names
from pipelines.store.checkpoint import CheckpointError
from pipelines.store.codes import TWO_LEVELS

# ------------------------------------------------------------------------------------------------
# What a prior was trained on

LEVELS = level_names(TWO_LEVELS)  # the levels priors are trained on so far: two-level code databases


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
    against its VQ-VAE, evaluation against the database it is given."""

    level: str
    vqvae_sha256: str
    image_size: int
    top_shape: tuple[int, int]
    bottom_shape: tuple[int, int]
    top_codes: int
    bottom_codes: int
    n_classes: int
    database: str | None = None  # database_identity; None where unknown (a prior from before it was stored)

    @classmethod
    def of_database(cls, metadata: dict, level: str) -> "PriorProvenance":
        return cls._of_fields(metadata, level, database_identity(metadata))

    @classmethod
    def _of_fields(cls, fields: dict, level: str, database: str | None) -> "PriorProvenance":
        fields = {name: fields[name] for name in PROVENANCE_FIELDS}
        fields.update(top_shape=tuple(fields["top_shape"]), bottom_shape=tuple(fields["bottom_shape"]))
        return cls(level=level, database=database, **fields)

    def to_extra(self) -> dict:
        """As a checkpoint's extra metadata: {"level": ..., "codes": {the database's fields, its identity}}."""
        codes = {name: getattr(self, name) for name in PROVENANCE_FIELDS}
        return {"level": self.level, "codes": {**codes, "database": self.database}}

    @classmethod
    def from_extra(cls, extra: dict, path) -> "PriorProvenance":
        """From a checkpoint's extra metadata; CheckpointError naming `path` if it holds none."""
        codes = extra.get("codes")
        if extra.get("level") not in LEVELS or not isinstance(codes, dict):
            raise CheckpointError(f"{path} does not record the code database it was trained on")
        try:
            return cls._of_fields(codes, extra["level"], codes.get("database"))
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"{path} has a damaged record of its code database ({error!r})") from None

    def same_database(self, other: "PriorProvenance") -> bool:
        """Whether `other` (of a code database) describes the database this prior trained on, by their
        identities; a prior that stored none (from before it was kept) is taken at its word."""
        return self.database is None or self.database == other.database


PROVENANCE_FIELDS = tuple(name for name in PriorProvenance.__dataclass_fields__ if name not in ("level", "database"))


def prior_fields(record: PriorProvenance) -> dict:
    """The PixelSNAILConfig fields that a code database (or a VQ-VAE, described by the same record)
    fixes for a prior of the record's level: grid, codebook, conditions."""
    level = record.level
    fields = {
        "shape": getattr(record, f"{level}_shape"),
        "n_codes": getattr(record, f"{level}_codes"),
        "n_classes": record.n_classes if record.n_classes > 1 else 0,  # one class: no condition
        "cond_codes": None,
        "cond_shape": None,
    }
    if level == "bottom":
        fields.update(cond_codes=record.top_codes, cond_shape=record.top_shape)
    return fields


def check_fits(config, record: PriorProvenance, what: str) -> None:
    """Raises ValueError, naming both values, where a prior's config does not fit `what` (a code
    database or a VQ-VAE, described by `record`)."""
    for name, expected in prior_fields(record).items():
        actual = getattr(config, name)
        if actual != expected:
            raise ValueError(f"the {record.level} prior has {name}={actual} but {what} has {expected}")
