"""Named PixelSNAIL settings: the model and the training hyper-parameters that go with it."""

from dataclasses import dataclass, replace

from prior.pixelsnail import PixelSNAILConfig


@dataclass(frozen=True)
class Preset:
    model: PixelSNAILConfig
    batch_size: int
    ema_decay: float  # Polyak averaging of the weights; evaluation and sampling use the average
    lr: float = 1e-3
    lr_decay: float = 0.999998  # multiplied into the learning rate every step


PRESETS = {
    # the paper's CIFAR-10 model: 12 blocks x 4 gated resnets, 256 filters, ~46M parameters
    "cifar10": Preset(
        model=PixelSNAILConfig(shape=(32, 32), channels=256, n_blocks=12, n_res_blocks=4, dropout=0.5, n_mixtures=10),
        batch_size=8,
        ema_decay=0.9995,
    ),
    "imagenet32": Preset(
        model=PixelSNAILConfig(shape=(32, 32), channels=256, n_blocks=12, n_res_blocks=4, dropout=0.0, n_mixtures=32),
        batch_size=8,
        ema_decay=0.9997,
    ),
    # the largest model that learns usefully in minutes on 2 CPU cores
    "cpu-small": Preset(
        model=PixelSNAILConfig(
            shape=(32, 32), channels=64, n_blocks=2, n_res_blocks=2, dropout=0.0, n_mixtures=5,
            key_channels=16, value_channels=32,
        ),
        batch_size=32,
        ema_decay=0.995,
        lr=2e-3,
        lr_decay=0.9995,
    ),
    # for smoke tests: 8x8 images, seconds per hundred steps; learns little
    "tiny": Preset(
        model=PixelSNAILConfig(
            shape=(8, 8), channels=16, n_blocks=1, n_res_blocks=1, dropout=0.0, n_mixtures=2,
            key_channels=4, value_channels=8,
        ),
        batch_size=8,
        ema_decay=0.9,
        lr=3e-3,
        lr_decay=1.0,
    ),
}


def get_preset(name, **model_overrides):
    """The named preset, with any model config fields replaced by `model_overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return replace(preset, model=replace(preset.model, **model_overrides))
