from prior.pixelsnail import PixelSNAIL, PixelSNAILConfig
from prior.presets import PRESETS, Preset, get_preset

__all__ = ["PixelSNAIL", "PixelSNAILConfig", "PRESETS", "Preset", "get_preset"]
