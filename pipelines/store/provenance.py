"""What a prior was trained on: its level and its code database's VQ-VAE, grids and codebooks,
stored in the prior's checkpoint and checked against the VQ-VAE it is sampled with."""

from dataclasses import dataclass

from modelkit import level_names
from pipelines.store.checkpoint import CheckpointError
from pipelines.store.codes import TWO_LEVELS

# ------------------------------------------------------------------------------------------------
# What a prior was trained on

LEVELS = level_names(TWO_LEVELS)  # the levels priors are trained on so far: two-level code databases


@dataclass(frozen=True)
class PriorProvenance:
    """What a prior was trained on: its level and the code database's VQ-VAE (file hash), image size,
    grids, codebooks and classes. The prior trainer writes it into the checkpoint's metadata
    (`to_extra`); generation reads it back (`from_extra`) and checks it against its VQ-VAE."""

    level: str
    vqvae_sha256: str
    image_size: int
    top_shape: tuple[int, int]
    bottom_shape: tuple[int, int]
    top_codes: int
    bottom_codes: int
    n_classes: int

    @classmethod
    def of_database(cls, metadata: dict, level: str) -> "PriorProvenance":
        fields = {name: metadata[name] for name in PROVENANCE_FIELDS}
        fields.update(top_shape=tuple(fields["top_shape"]), bottom_shape=tuple(fields["bottom_shape"]))
        return cls(level=level, **fields)

    def to_extra(self) -> dict:
        """As a checkpoint's extra metadata: {"level": ..., "codes": {the database's fields}}."""
        return {"level": self.level, "codes": {name: getattr(self, name) for name in PROVENANCE_FIELDS}}

    @classmethod
    def from_extra(cls, extra: dict, path) -> "PriorProvenance":
        """From a checkpoint's extra metadata; CheckpointError naming `path` if it holds none."""
        codes = extra.get("codes")
        if extra.get("level") not in LEVELS or not isinstance(codes, dict):
            raise CheckpointError(f"{path} does not record the code database it was trained on")
        try:
            return cls.of_database(codes, extra["level"])
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"{path} has a damaged record of its code database ({error!r})") from None


PROVENANCE_FIELDS = tuple(name for name in PriorProvenance.__dataclass_fields__ if name != "level")


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
