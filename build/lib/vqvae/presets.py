"""Named VQ-VAE-2 settings: the model and the training hyper-parameters that go with it."""

from dataclasses import dataclass

from vqvae.config import VQVAE2Config


@dataclass(frozen=True)
class Preset:
    model: VQVAE2Config
    batch_size: int = 16
    lr: float = 3e-4  # Adam with torch's default betas


PRESETS = {
    "vqvae2": Preset(VQVAE2Config()),  # the paper's: 128 channels, codebooks 512 x 64
    # learns 64x64 photo crops in minutes on 2 CPU cores
    "cpu-small": Preset(VQVAE2Config(channels=64, res_channels=32, n_res_blocks=1, top_codes=256, bottom_codes=256,
                                     code_dim=32)),
}


def get_preset(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
