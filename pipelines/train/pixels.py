"""Training PixelSNAIL on images: the pixel-space trainer (`pipelines.train.pixelsnail`'s task on
an image dataset)."""

from dataclasses import dataclass

from pipelines.data.datasets import image_inputs, load_dataset
from pipelines.train import run_state
from pipelines.train.loop import fit
from pipelines.train.pixelsnail import PixelSNAILTask, RunConfig, Source
from pipelines.train.run_config import image_data_field
from prior import PixelSNAILConfig


@dataclass
class TrainConfig(RunConfig):
    data: str | None = image_data_field()

    def run_defaults(self):
        return {**super().run_defaults(), "data": "builtin"}


def image_source(data, size):
    return Source(load_dataset(data, "train", size), load_dataset(data, "test", size), image_inputs, {"data": data})


def train(cfg: TrainConfig):
    """Trains (or resumes) a run on images; returns the final test bits/dim with the EMA weights."""
    cfg, model_config = run_state.resolve(cfg, PixelSNAILConfig)
    model_config = model_config or cfg.preset_model()
    if model_config.shape[0] != model_config.shape[1] or not model_config.pixel_mode:
        raise ValueError(f"image training needs a square pixel-mode model, got {model_config.shape}")
    return fit(PixelSNAILTask(cfg, model_config, image_source(cfg.data, model_config.shape[0]), unit="dim"))
