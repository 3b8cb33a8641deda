from vqvae.config import VQVAE2Config
from vqvae.model import VQVAE2, QuantizerStats, VQVAE2Output
from vqvae.quantizer import QuantizerOutput, VectorQuantizerEMA

__all__ = ["VQVAE2", "VQVAE2Config", "VQVAE2Output", "QuantizerStats", "VectorQuantizerEMA", "QuantizerOutput"]
