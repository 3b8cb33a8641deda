"""VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019, "Generating Diverse High-Fidelity Images with
VQ-VAE-2"): a two-level hierarchy of discrete latents.

An image of side S is encoded to bottom features at S/4 and, from those, top features at S/8.
The top features are quantized first; the decoded top latents are concatenated with the bottom
features to quantize the bottom level, so the bottom codes hold what the top codes miss. The
decoder upsamples the top latents to S/4, concatenates the bottom latents and upsamples x4.

Example, the paper's 256x256 model:
    >>> model = VQVAE2(VQVAE2Config())
    >>> model.code_shapes(256)                               # ((32, 32), (64, 64))
    >>> images = torch.rand(4, 3, 256, 256) * 2 - 1
    >>> out = model(images)                                  # out.reconstruction: (4, 3, 256, 256)
    >>> top_codes, bottom_codes = model.encode(images)       # (4, 32, 32), (4, 64, 64) long
    >>> images = model.decode_codes(top_codes, bottom_codes) # (4, 3, 256, 256) in [-1, 1]
"""

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from modelkit import check_range
from vqvae.config import VQVAE2Config
from vqvae.quantizer import VectorQuantizerEMA


class QuantizerStats(NamedTuple):
    perplexity: torch.Tensor  # (): exp(entropy of the code frequencies in this batch)
    usage: torch.Tensor  # (): fraction of the codebook used at least once in this batch


class VQVAE2Output(NamedTuple):
    reconstruction: torch.Tensor  # (B, 3, S, S), not clamped
    loss: torch.Tensor  # (): reconstruction_loss + commitment_loss
    reconstruction_loss: torch.Tensor  # (): mean squared error, fp32, images in [-1, 1]
    commitment_loss: torch.Tensor  # (): commitment terms of both levels, fp32
    top: QuantizerStats
    bottom: QuantizerStats


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), with a narrower middle (res_channels)."""

    def __init__(self, channels, res_channels):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, res_channels, 3, padding=1)
        self.conv1 = nn.Conv2d(res_channels, channels, 1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


def residual_stack(c: VQVAE2Config):
    """n_res_blocks residual blocks, then a ReLU: (B, C, H, W) -> (B, C, H, W)."""
    blocks = [ResidualBlock(c.channels, c.res_channels) for _ in range(c.n_res_blocks)]
    return nn.Sequential(*blocks, nn.ReLU())


def encoder_x4(in_channels, c: VQVAE2Config):
    """(B, in, H, W) -> (B, C, H/4, W/4): two stride-2 4x4 convs, a 3x3 conv, a residual stack."""
    return nn.Sequential(
        nn.Conv2d(in_channels, c.channels // 2, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c.channels // 2, c.channels, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c.channels, c.channels, 3, padding=1),
        residual_stack(c),
    )


def encoder_x2(in_channels, c: VQVAE2Config):
    """(B, in, H, W) -> (B, C, H/2, W/2): one stride-2 4x4 conv, a 3x3 conv, a residual stack."""
    return nn.Sequential(
        nn.Conv2d(in_channels, c.channels // 2, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c.channels // 2, c.channels, 3, padding=1),
        residual_stack(c),
    )


def decoder_x2(in_channels, out_channels, c: VQVAE2Config):
    """(B, in, H, W) -> (B, out, 2H, 2W): a 3x3 conv, a residual stack, a stride-2 transposed conv."""
    return nn.Sequential(
        nn.Conv2d(in_channels, c.channels, 3, padding=1),
        residual_stack(c),
        nn.ConvTranspose2d(c.channels, out_channels, 4, stride=2, padding=1),
    )


def decoder_x4(in_channels, out_channels, c: VQVAE2Config):
    """(B, in, H, W) -> (B, out, 4H, 4W): a 3x3 conv, a residual stack, two stride-2 transposed convs."""
    return nn.Sequential(
        nn.Conv2d(in_channels, c.channels, 3, padding=1),
        residual_stack(c),
        nn.ConvTranspose2d(c.channels, c.channels // 2, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(c.channels // 2, out_channels, 4, stride=2, padding=1),
    )


class VQVAE2(nn.Module):
    def __init__(self, config: VQVAE2Config):
        super().__init__()
        c = self.config = config
        self.encoder_bottom = encoder_x4(3, c)  # image -> bottom features, S/4
        self.encoder_top = encoder_x2(c.channels, c)  # bottom features -> top features, S/8
        self.pre_quantize_top = nn.Conv2d(c.channels, c.code_dim, 1)
        self.quantizer_top = self.make_quantizer(c.top_codes)
        self.decoder_top = decoder_x2(c.code_dim, c.code_dim, c)  # top latents -> S/4, to condition the bottom
        self.pre_quantize_bottom = nn.Conv2d(c.code_dim + c.channels, c.code_dim, 1)
        self.quantizer_bottom = self.make_quantizer(c.bottom_codes)
        self.upsample_top = nn.ConvTranspose2d(c.code_dim, c.code_dim, 4, stride=2, padding=1)
        self.decoder = decoder_x4(2 * c.code_dim, 3, c)  # [top upsampled, bottom] latents -> image

    def make_quantizer(self, n_codes):
        c = self.config
        return VectorQuantizerEMA(n_codes, c.code_dim, c.decay, c.eps, c.commitment, c.dead_code_threshold)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def code_shapes(self, image_size: int):
        """Image side S -> ((S/8, S/8), (S/4, S/4)), the top and bottom code grid shapes."""
        check_side("image_size", image_size)
        return (image_size // 8, image_size // 8), (image_size // 4, image_size // 4)

    # -- training -----------------------------------------------------------------------------

    def forward(self, images):
        """(B, 3, S, S) images in [-1, 1] -> VQVAE2Output. Updates the codebooks in training mode."""
        check_images(images)
        bottom_features = self.encoder_bottom(images)  # (B, C, S/4, S/4)
        top_features = self.encoder_top(bottom_features)  # (B, C, S/8, S/8)
        top = self.quantizer_top(self.pre_quantize_top(top_features))  # quantized (B, D, S/8, S/8)
        bottom = self.quantizer_bottom(self.bottom_latents(top.quantized, bottom_features))  # (B, D, S/4, S/4)
        reconstruction = self.decode(top.quantized, bottom.quantized)  # (B, 3, S, S)
        reconstruction_loss = F.mse_loss(reconstruction.float(), images.float())
        commitment_loss = top.loss + bottom.loss
        return VQVAE2Output(
            reconstruction,
            reconstruction_loss + commitment_loss,
            reconstruction_loss,
            commitment_loss,
            QuantizerStats(top.perplexity, top.usage),
            QuantizerStats(bottom.perplexity, bottom.usage),
        )

    def bottom_latents(self, top_quantized, bottom_features):
        """The pre-quantization bottom latents: the bottom features conditioned on the decoded
        top latents. (B, D, S/8, S/8), (B, C, S/4, S/4) -> (B, D, S/4, S/4)."""
        top_decoded = self.decoder_top(top_quantized)  # (B, D, S/4, S/4)
        return self.pre_quantize_bottom(torch.cat([top_decoded, bottom_features], dim=1))

    def decode(self, top_quantized, bottom_quantized):
        """(B, D, S/8, S/8), (B, D, S/4, S/4) quantized latents -> (B, 3, S, S), not clamped."""
        top_upsampled = self.upsample_top(top_quantized)  # (B, D, S/4, S/4)
        return self.decoder(torch.cat([top_upsampled, bottom_quantized], dim=1))

    # -- codes ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images):
        """(B, 3, S, S) images -> top codes (B, S/8, S/8), bottom codes (B, S/4, S/4), long.

        Never changes the codebooks, in either mode.
        """
        check_images(images)
        bottom_features = self.encoder_bottom(images)
        top_codes = self.quantizer_top.codes_of(self.pre_quantize_top(self.encoder_top(bottom_features)))
        top_quantized = self.quantizer_top.lookup(top_codes)
        bottom_codes = self.quantizer_bottom.codes_of(self.bottom_latents(top_quantized, bottom_features))
        return top_codes, bottom_codes

    @torch.no_grad()
    def decode_codes(self, top_codes, bottom_codes):
        """top codes (B, Ht, Wt), bottom codes (B, 2Ht, 2Wt) -> images (B, 3, 8Ht, 8Wt) clamped to [-1, 1]."""
        self.check_codes(top_codes, bottom_codes)
        top_quantized = self.quantizer_top.lookup(top_codes)  # (B, D, Ht, Wt)
        bottom_quantized = self.quantizer_bottom.lookup(bottom_codes)  # (B, D, 2Ht, 2Wt)
        return self.decode(top_quantized, bottom_quantized).clamp(-1, 1)

    def check_codes(self, top_codes, bottom_codes):
        for name, codes in (("top codes", top_codes), ("bottom codes", bottom_codes)):
            if codes.dim() != 3 or codes.is_floating_point():
                raise ValueError(f"{name} must be integer (B, H, W), got {codes.dtype} {tuple(codes.shape)}")
        batch, height, width = top_codes.shape
        if tuple(bottom_codes.shape) != (batch, 2 * height, 2 * width):
            raise ValueError(
                f"bottom codes must have shape ({batch}, {2 * height}, {2 * width}) for top codes of shape "
                f"{tuple(top_codes.shape)}, got {tuple(bottom_codes.shape)}"
            )
        check_range("top codes", top_codes, self.config.top_codes)
        check_range("bottom codes", bottom_codes, self.config.bottom_codes)


def check_side(name, side):
    if side < 8 or side % 8:
        raise ValueError(f"{name} must be a multiple of 8 and >= 8 (two levels of stride 4 and 8), got {side}")


def check_images(images):
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    check_side("image height", images.shape[2])
    check_side("image width", images.shape[3])
