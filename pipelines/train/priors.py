"""Training the VQ-VAE-2 priors: PixelSNAIL in code mode over one level's code grid.

The top prior models the top grid, conditioned on the class label when the database has labels.
The prior of every other level (the bottom of two; the middle and the bottom of three) models its
grid conditioned on the codes of the level above it (through its conditioning stack) and the
label. Grid shapes and codebook sizes come from the code database; the preset gives the network.
Every 20th record (0, 20, 40, ...) is held out for validation.

The task is PixelSNAIL's (`pipelines.train.pixelsnail.PixelSNAILTask`), on codes.
"""

from dataclasses import dataclass, replace

from pipelines.data.codes import code_splits
from pipelines.store.provenance import check_fits, prior_fields
from pipelines.train import run_state
from pipelines.train.loop import fit
from pipelines.train.pixelsnail import PixelSNAILTask, RunConfig, Source
from pipelines.train.run_config import data_field, run_field, setting
from prior import PixelSNAILConfig


@dataclass
class PriorTrainConfig(RunConfig):
    codes: str | None = data_field("code database written by scripts/extract_codes.py", required=True)
    level: str | None = run_field("the code grid to model: top, middle (three levels), bottom, or an index 0 (top) "
                                  "to N-1 (bottom) of the database's N levels (default top)")
    out: str = setting("runs/prior-top", "run directory (checkpoint, state, log)", required=True)
    n_samples: int = setting(0, command_line=False)  # priors draw no sample grid (scripts/sample.py decodes samples)

    def default_preset(self):
        # the top prior's, or the conditioned one for any level below it (grids come from the database)
        return "cpu-top" if self.level in (None, "top", "0", "level0") else "cpu-bottom"

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
    cfg = replace(cfg, level=provenance.level)  # an index given as --level is stored by its name
    model_config = model_config or cfg.preset_model(**prior_fields(provenance))
    check_fits(model_config, provenance, f"the code database {cfg.codes}")
    return fit(PixelSNAILTask(cfg, model_config, source, unit="code"))
