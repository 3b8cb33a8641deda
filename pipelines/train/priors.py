"""Training the VQ-VAE-2 priors: PixelSNAIL in code mode over the top or the bottom code grid.

The top prior models the top grid, conditioned on the class label when the database has labels.
The bottom prior models the bottom grid conditioned on the top codes (through its conditioning
stack) and the label. Grid shapes and codebook sizes come from the code database; the preset
gives the network. Every 20th record (0, 20, 40, ...) is held out for validation.

The task is PixelSNAIL's (`pipelines.train.pixelsnail.PixelSNAILTask`), on codes.
"""

from dataclasses import dataclass

from pipelines.data.codes import code_splits
from pipelines.store.provenance import LEVELS, check_fits, prior_fields
from pipelines.train import run_state
from pipelines.train.loop import fit
from pipelines.train.pixelsnail import PixelSNAILTask, RunConfig, Source
from pipelines.train.run_config import data_field, run_field, setting
from prior import PixelSNAILConfig


@dataclass
class PriorTrainConfig(RunConfig):
    codes: str | None = data_field("code database written by scripts/extract_codes.py", required=True)
    level: str | None = run_field("the code grid to model (default top)", choices=LEVELS)
    out: str = setting("runs/prior-top", "run directory (checkpoint, state, log)", required=True)
    n_samples: int = setting(0, command_line=False)  # priors draw no sample grid (scripts/sample.py decodes samples)

    def __post_init__(self):
        super().__post_init__()
        if self.level is not None and self.level not in LEVELS:
            raise ValueError(f"--level must be one of {', '.join(LEVELS)}, got {self.level!r}")

    def default_preset(self):
        return f"cpu-{self.level or 'top'}"

    def run_defaults(self):
        return {**super().run_defaults(), "level": "top", "codes": "codes.lmdb"}


def code_source(path, level):
    """The code database at `path` as the training source of a prior of `level`."""
    splits = code_splits(path, level)
    provenance = splits.provenance
    identity = {"vqvae_sha256": provenance.vqvae_sha256}
    return Source(splits.train_set, splits.test_set, splits.inputs, provenance.to_extra(), identity), provenance


def train(cfg: PriorTrainConfig):
    """Trains (or resumes) a prior; returns the final validation bits per code (EMA weights)."""
    cfg, model_config = run_state.resolve(cfg, PixelSNAILConfig)
    source, provenance = code_source(cfg.codes, cfg.level)
    model_config = model_config or cfg.preset_model(**prior_fields(provenance))
    check_fits(model_config, provenance, f"the code database {cfg.codes}")
    return fit(PixelSNAILTask(cfg, model_config, source, unit="code"))
