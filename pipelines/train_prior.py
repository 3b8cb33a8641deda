"""Training the VQ-VAE-2 priors: PixelSNAIL in code mode over the top or the bottom code grid.

The top prior models the top grid, conditioned on the class label when the database has labels.
The bottom prior models the bottom grid conditioned on the top codes (through its conditioning
stack) and the label. Grid shapes and codebook sizes come from the code database; the preset
gives the network. Every 20th record (0, 20, 40, ...) is held out for validation.

The task is the pixel-space trainer's (`train_pixel.PixelSNAILTask`) on codes.
"""

from dataclasses import dataclass

from torch.utils.data import Subset

from pipelines import run_state
from pipelines.codes import LEVELS, CodeDataset, PriorProvenance, check_fits, prior_fields
from pipelines.loop import fit
from pipelines.run_config import data_field, run_field, setting
from pipelines.train_pixel import PixelSNAILTask, RunConfig, Source
from prior import PixelSNAILConfig

HOLDOUT_EVERY = 20


@dataclass
class PriorTrainConfig(RunConfig):
    codes: str | None = data_field("code database written by scripts/extract_codes.py", required=True)
    level: str | None = run_field("the code grid to model (default top)", choices=LEVELS)
    out: str = setting("runs/prior-top", "run directory (checkpoint, state, log)", required=True)
    n_samples: int = setting(0, command_line=False)  # priors draw no sample grid (scripts/sample.py decodes samples)

    def __post_init__(self):
        super().__post_init__()
        if self.level is not None and self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")

    def default_preset(self):
        return f"cpu-{self.level or 'top'}"

    def run_defaults(self):
        return {**super().run_defaults(), "level": "top", "codes": "codes.lmdb"}


def code_inputs(level, labelled):
    """A batch (top, bottom, label) -> the model's (x, label, cond) for a level."""

    def inputs(batch):
        top, bottom, label = batch
        label = label if labelled else None
        return (top, label, None) if level == "top" else (bottom, label, top)

    return inputs


def code_source(path, level):
    dataset = CodeDataset(path)
    metadata = dataset.metadata
    every = range(len(dataset))
    test = [i for i in every if i % HOLDOUT_EVERY == 0]
    train = [i for i in every if i % HOLDOUT_EVERY]
    if not train:
        raise ValueError(f"{path} holds {len(dataset)} records: too few to hold out every {HOLDOUT_EVERY}th")
    provenance = PriorProvenance.of_database(metadata, level)
    inputs = code_inputs(level, metadata["n_classes"] > 1)
    identity = {"vqvae_sha256": metadata["vqvae_sha256"]}
    return Source(Subset(dataset, train), Subset(dataset, test), inputs, provenance.to_extra(), identity), provenance


def train(cfg: PriorTrainConfig):
    """Trains (or resumes) a prior; returns the final validation bits per code (EMA weights)."""
    cfg, model_config = run_state.resolve(cfg, PixelSNAILConfig)
    source, provenance = code_source(cfg.codes, cfg.level)
    model_config = model_config or cfg.preset_model(**prior_fields(provenance))
    check_fits(model_config, provenance, f"the code database {cfg.codes}")
    return fit(PixelSNAILTask(cfg, model_config, source, unit="code"))
