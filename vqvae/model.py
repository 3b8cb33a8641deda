"""VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019, "Generating Diverse High-Fidelity Images with
VQ-VAE-2"): a hierarchy of discrete latents, two levels for ImageNet 256, three for FFHQ 1024.

An image of side S is encoded to bottom features at S/s (s = `bottom_stride`, 4 by default) and,
from those, the features of each level above at half the side of the level below: with two
levels, top features at S/8. The top features are quantized first. Each level below is quantized
given the decoded levels above it: the levels above, decoded to its grid, are concatenated with
its features, so its codes hold what the levels above miss. The decoder combines every level:
from the top down, the latents so far are upsampled x2 and concatenated with the next level's,
and the bottom ones with all of this are upsampled to the image.

The paper spells this out for two levels only; three and more follow the same two rules (a
level is quantized given the decoded levels above it, the decoder sees every level), as Jukebox
chains its levels. With two levels the modules, their names and their order are the ones the
two-level model always had, so its checkpoints load unchanged.

Example, the paper's 256x256 model:
    >>> model = VQVAE2(VQVAE2Config())
    >>> model.code_shapes(256)                               # ((32, 32), (64, 64))
    >>> images = torch.rand(4, 3, 256, 256) * 2 - 1
    >>> out = model(images)                                  # out.reconstruction: (4, 3, 256, 256)
    >>> top_codes, bottom_codes = model.encode(images)       # (4, 32, 32), (4, 64, 64) long
    >>> images = model.decode_codes(top_codes, bottom_codes) # (4, 3, 256, 256) in [-1, 1]
    >>> VQVAE2(VQVAE2Config(levels=3)).code_shapes(64)       # ((4, 4), (8, 8), (16, 16))
"""

import math
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
    commitment_loss: torch.Tensor  # (): commitment terms of every level, fp32
    levels: tuple[QuantizerStats, ...]  # one per level, top first

    @property
    def top(self) -> QuantizerStats:
        return self.levels[0]

    @property
    def bottom(self) -> QuantizerStats:
        return self.levels[-1]


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


def encoder_bottom(c: VQVAE2Config):
    """(B, 3, S, S) -> (B, C, S/s, S/s), s = bottom_stride: log2(s) stride-2 4x4 convs (C/2 channels
    up to the last), a 3x3 conv, a residual stack. At s = 4 the paper's encoder: two, then the 3x3."""
    widths = [3] + [c.channels // 2] * (int(math.log2(c.bottom_stride)) - 1) + [c.channels]
    layers = []
    for width_in, width_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(width_in, width_out, 4, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(c.channels, c.channels, 3, padding=1), residual_stack(c))


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


def decoder_to_image(in_channels, c: VQVAE2Config):
    """(B, in, H, W) -> (B, 3, sH, sW), s = bottom_stride: a 3x3 conv, a residual stack, log2(s)
    stride-2 transposed convs (C, then C/2 channels). At s = 4 the paper's decoder: two of them."""
    widths = [c.channels] + [c.channels // 2] * (int(math.log2(c.bottom_stride)) - 1) + [3]
    layers = [nn.Conv2d(in_channels, c.channels, 3, padding=1), residual_stack(c)]
    for width_in, width_out in zip(widths, widths[1:]):
        layers += [nn.ConvTranspose2d(width_in, width_out, 4, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # no ReLU after the last: the output is not clamped


class VQVAE2(nn.Module):
    """The modules of level k are named after it (`encoder_top`, `quantizer_middle`, ...):

    encoder_<k>       the bottom level's reads the image (`bottom_stride`); every other level's reads
                      the features of the level below and halves their side
    pre_quantize_<k>  features -> latents to quantize: at the top the features alone, below it the
                      features concatenated with the levels above decoded to this level's grid
    quantizer_<k>     the level's codebook
    decoder_<k>       (every level but the bottom) the levels down to k, decoded to the grid of the
                      level below k: what that level is quantized given
    upsample_<k>      (every level but the bottom) the decoder's x2 upsampling of the latents of the
                      levels down to k, to be concatenated with the next level's
    decoder           the latents of every level, at the bottom grid -> the image
    """

    def __init__(self, config: VQVAE2Config):
        super().__init__()
        c = self.config = config
        names, last = c.level_names, c.levels - 1
        # registered in this order so that a two-level model has its modules (and its random
        # initial weights under a seed) in the order the two-level model always had
        self.add_module(f"encoder_{names[last]}", encoder_bottom(c))  # image -> S/s
        for name in reversed(names[:last]):
            self.add_module(f"encoder_{name}", encoder_x2(c.channels, c))  # features below -> half the side
        for k, (name, n_codes) in enumerate(zip(names, c.codebook_sizes())):
            if k > 0:
                # levels 0..k-1 -> level k's grid: the top's latents alone, below them what the
                # level above was given concatenated with its latents
                context = c.code_dim if k == 1 else 2 * c.code_dim
                self.add_module(f"decoder_{names[k - 1]}", decoder_x2(context, c.code_dim, c))
            pre_quantize_in = c.channels if k == 0 else c.code_dim + c.channels
            self.add_module(f"pre_quantize_{name}", nn.Conv2d(pre_quantize_in, c.code_dim, 1))
            self.add_module(f"quantizer_{name}", self.make_quantizer(n_codes))
        for k, name in enumerate(names[:last]):
            upsample_in = c.code_dim if k == 0 else 2 * c.code_dim
            self.add_module(f"upsample_{name}", nn.ConvTranspose2d(upsample_in, c.code_dim, 4, stride=2, padding=1))
        self.decoder = decoder_to_image(2 * c.code_dim, c)  # [levels above upsampled, bottom] latents -> image

    def make_quantizer(self, n_codes):
        c = self.config
        return VectorQuantizerEMA(n_codes, c.code_dim, c.decay, c.eps, c.commitment, c.dead_code_threshold)

    def level_module(self, kind, k):
        """The module `kind` ("encoder", "quantizer", ...) of level k (0: the top)."""
        return getattr(self, f"{kind}_{self.config.level_names[k]}")

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def code_shapes(self, image_size: int):
        """Image side S -> one code grid shape per level, top first: ((S/8, S/8), (S/4, S/4)) for
        two levels with the default bottom stride."""
        check_side("image_size", image_size, self.config)
        return tuple((image_size // stride, image_size // stride) for stride in self.config.strides())

    # -- training -----------------------------------------------------------------------------

    def forward(self, images):
        """(B, 3, S, S) images in [-1, 1] -> VQVAE2Output. Updates the codebooks in training mode."""
        check_images(images, self.config)

        def quantize(quantizer, latents):
            out = quantizer(latents)
            return out.quantized, out

        quantized, outs = self.quantize_top_down(self.features(images), quantize)
        reconstruction = self.decode(*quantized)  # (B, 3, S, S)
        reconstruction_loss = F.mse_loss(reconstruction.float(), images.float())
        commitment_loss = sum(out.loss for out in outs)
        return VQVAE2Output(
            reconstruction,
            reconstruction_loss + commitment_loss,
            reconstruction_loss,
            commitment_loss,
            tuple(QuantizerStats(out.perplexity, out.usage) for out in outs),
        )

    def features(self, images):
        """(B, 3, S, S) -> the encoder features of every level, top first: (B, C, S/stride, S/stride)."""
        features = [self.level_module("encoder", self.config.levels - 1)(images)]
        for k in reversed(range(self.config.levels - 1)):
            features.insert(0, self.level_module("encoder", k)(features[0]))
        return features

    def quantize_top_down(self, features, quantize):
        """Quantizes the levels from the top, each given the decoded levels above it.

        features: per level, top first, (B, C, H_k, W_k); quantize(quantizer, latents (B, D, H_k, W_k))
        -> (quantized latents (B, D, H_k, W_k), anything). Returns (the quantized latents, the
        anythings), each a list per level, top first.
        """
        quantized, results = [], []
        above = None  # the levels above, decoded to this level's grid: (B, D, H_k, W_k)
        for k, level_features in enumerate(features):
            inputs = level_features if above is None else torch.cat([above, level_features], dim=1)
            latents = self.level_module("pre_quantize", k)(inputs)  # (B, D, H_k, W_k)
            level_quantized, result = quantize(self.level_module("quantizer", k), latents)
            quantized.append(level_quantized)
            results.append(result)
            if k < self.config.levels - 1:
                context = level_quantized if above is None else torch.cat([above, level_quantized], dim=1)
                above = self.level_module("decoder", k)(context)  # (B, D, 2H_k, 2W_k)
        return quantized, results

    def decode(self, *quantized):
        """Quantized latents per level, top first, (B, D, H_k, W_k) -> (B, 3, S, S), not clamped."""
        combined = quantized[0]  # the latents of the levels so far, at the grid of the last one
        for k, level_quantized in enumerate(quantized[1:]):
            combined = torch.cat([self.level_module("upsample", k)(combined), level_quantized], dim=1)
        return self.decoder(combined)

    # -- codes ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images):
        """(B, 3, S, S) images -> one code grid per level, top first, long: with two levels top
        codes (B, S/8, S/8) and bottom codes (B, S/4, S/4).

        Never changes the codebooks, in either mode.
        """
        check_images(images, self.config)

        def nearest(quantizer, latents):
            codes = quantizer.codes_of(latents)
            return quantizer.lookup(codes), codes

        return tuple(self.quantize_top_down(self.features(images), nearest)[1])

    @torch.no_grad()
    def decode_codes(self, *codes):
        """One code grid per level, top first, each twice the side of the one above: top codes
        (B, Ht, Wt), bottom codes (B, 2Ht, 2Wt) for two levels -> images (B, 3, S, S) clamped to
        [-1, 1], S = Ht * the top stride."""
        self.check_codes(codes)
        quantized = [self.level_module("quantizer", k).lookup(level_codes) for k, level_codes in enumerate(codes)]
        return self.decode(*quantized).clamp(-1, 1)

    def check_codes(self, codes):
        names = [f"{name} codes" for name in self.config.level_names]
        if len(codes) != len(names):
            raise ValueError(f"expected {len(names)} code grids ({', '.join(names)}), got {len(codes)}")
        for name, level_codes in zip(names, codes):
            if level_codes.dim() != 3 or level_codes.is_floating_point():
                raise ValueError(f"{name} must be integer (B, H, W), got {level_codes.dtype} "
                                 f"{tuple(level_codes.shape)}")
        for k in range(1, len(codes)):
            batch, height, width = codes[k - 1].shape
            if tuple(codes[k].shape) != (batch, 2 * height, 2 * width):
                raise ValueError(
                    f"{names[k]} must have shape ({batch}, {2 * height}, {2 * width}) for {names[k - 1]} of shape "
                    f"{tuple(codes[k - 1].shape)}, got {tuple(codes[k].shape)}"
                )
        for name, level_codes, n_codes in zip(names, codes, self.config.codebook_sizes()):
            check_range(name, level_codes, n_codes)


NUMBER_WORDS = {2: "two", 3: "three"}


def check_side(name, side, config: VQVAE2Config):
    """The image side must give every level a whole grid of at least one code."""
    strides = config.strides()[::-1]  # bottom first
    top_stride = strides[-1]
    if side < top_stride or side % top_stride:
        levels = NUMBER_WORDS.get(config.levels, str(config.levels))
        raise ValueError(f"{name} must be a multiple of {top_stride} and >= {top_stride} ({levels} levels of stride "
                         f"{', '.join(map(str, strides[:-1]))} and {top_stride}), got {side}")


def check_images(images, config: VQVAE2Config):
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    check_side("image height", images.shape[2], config)
    check_side("image width", images.shape[3], config)
