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
from pipelines.codes import CodeDataset
from pipelines.run_config import run_field
from pipelines.loop import fit
from pipelines.train_pixel import PixelSNAILTask, RunConfig, Source
from prior import PixelSNAILConfig

LEVELS = ("top", "bottom")
HOLDOUT_EVERY = 20
# what a prior keeps of its code database's metadata, to be matched later against its VQ-VAE
CODE_FIELDS = ("vqvae_sha256", "image_size", "top_shape", "bottom_shape", "top_codes", "bottom_codes", "n_classes")


@dataclass
class PriorTrainConfig(RunConfig):
    codes: str | None = run_field()  # the code database written by extract_codes.py
    level: str | None = run_field()  # None: top
    out: str = "runs/prior-top"
    n_samples: int = 0  # priors draw no sample grid (scripts/sample.py decodes samples)

    def __post_init__(self):
        super().__post_init__()
        if self.level is not None and self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")

    def default_preset(self):
        return f"cpu-{self.level or 'top'}"

    def run_defaults(self):
        return {**super().run_defaults(), "level": "top", "codes": "codes.lmdb"}


def level_fields(metadata, level):
    """The PixelSNAILConfig fields a database fixes for a level: grid, codebook, conditions."""
    fields = {
        "shape": tuple(metadata[f"{level}_shape"]),
        "n_codes": metadata[f"{level}_codes"],
        "n_classes": metadata["n_classes"] if metadata["n_classes"] > 1 else 0,  # one class: no condition
        "cond_codes": None,
        "cond_shape": None,
    }
    if level == "bottom":
        fields.update(cond_codes=metadata["top_codes"], cond_shape=tuple(metadata["top_shape"]))
    return fields


def check_fits(config: PixelSNAILConfig, metadata, level, what):
    """Raises ValueError, naming both values, where a prior's config does not fit `what` (a code
    database or a VQ-VAE described by the same metadata fields)."""
    for name, expected in level_fields(metadata, level).items():
        actual = getattr(config, name)
        if actual != expected:
            raise ValueError(f"the {level} prior has {name}={actual} but {what} has {expected}")


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
    codes = {name: metadata[name] for name in CODE_FIELDS}
    return Source(Subset(dataset, train), Subset(dataset, test), code_inputs(level, metadata["n_classes"] > 1),
                  {"level": level, "codes": codes})


def train(cfg: PriorTrainConfig):
    """Trains (or resumes) a prior; returns the final validation bits per code (EMA weights)."""
    cfg, model_config = run_state.resolve(cfg, PixelSNAILConfig)
    source = code_source(cfg.codes, cfg.level)
    model_config = model_config or cfg.preset_model(**level_fields(source.metadata["codes"], cfg.level))
    check_fits(model_config, source.metadata["codes"], cfg.level, f"the code database {cfg.codes}")
    return fit(PixelSNAILTask(cfg, model_config, source, unit="code"))
