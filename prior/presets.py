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


# the VQ-VAE-2 priors' per-process batch and optimisation (the paper's batch of 1024 / 512 is
# processes x batch_size x gradient accumulation)
PRIOR_TRAINING = dict(batch_size=16, ema_decay=0.9995, lr=3e-4)

# the models that learn in minutes on 2 CPU cores: large batches of small images, a fast schedule
CPU_TRAINING = dict(batch_size=32, ema_decay=0.995, lr=2e-3, lr_decay=0.9995)

# The VQ-VAE-2 priors of the paper's appendix for ImageNet 256 (grid and codebook come from the code
# database). The top prior: 512 hidden channels, residual units of 2048, 20 gated resnets with an
# 8-head attention block after every fifth (4 in all), 5x5 convs, dropout 0.1, an output stack of 20.
# The paper also drops out "the logits of each attention matrix" without giving a rate: the
# table's dropout, 0.1, is taken for it too.
VQVAE2_TOP = Preset(
    model=PixelSNAILConfig(
        shape=(32, 32), n_codes=512, channels=512, res_channels=2048, n_blocks=4, n_res_blocks=5,
        kernel_size=5, attention=True, n_heads=8, key_channels=128, value_channels=256, dropout=0.1,
        attention_dropout=0.1, embed_channels=128, cond_channels=256, out_res_blocks=20,
    ),
    **PRIOR_TRAINING,
)

# The bottom prior: 20 gated resnets (residual units of 1024) in two streams, no attention,
# conditioned on the top codes through a stack of 20 residual blocks.
VQVAE2_BOTTOM = Preset(
    model=PixelSNAILConfig(
        shape=(64, 64), n_codes=512, cond_codes=512, cond_shape=(32, 32), channels=512, res_channels=1024,
        n_blocks=1, n_res_blocks=20, kernel_size=5, attention=False, streams="two", dropout=0.1,
        embed_channels=128, cond_channels=256, cond_res_blocks=20,
    ),
    **PRIOR_TRAINING,
)


# The three priors of the paper's FFHQ-1024 model (code maps 32x32, 64x64 and 128x128, each level
# conditioned on the one above; grids and codebooks come from the code database, 512 codes here as
# in its VQ-VAE preset vqvae2-ffhq1024). The facts kept in shared/DESIGN.md are the ImageNet table;
# for FFHQ what is chosen here, and why:
# - FFHQ has no classes: the top prior is unconditional (n_classes comes from the database: 0).
# - top, 32x32: the ImageNet top prior unchanged (the same grid; global structure of a face needs
#   the attention the top level has there), attention dropout 0.1 as in vqvae2-top.
# - middle, 64x64 conditioned on the top: the ImageNet bottom prior unchanged (the same grid and
#   condition sizes: the role the bottom plays in the two-level model).
# - bottom, 128x128 conditioned on the middle: the same convolutional network again (no attention,
#   whose N x N weights at 16,384 positions would cost 256M entries per head and example); its
#   activations are 4x the middle prior's per example, so a quarter of the per-process batch keeps
#   the memory per step of the others (the paper's batch is reached by processes x accumulation).
VQVAE2_FFHQ_TOP = VQVAE2_TOP
VQVAE2_FFHQ_MIDDLE = VQVAE2_BOTTOM
VQVAE2_FFHQ_BOTTOM = Preset(
    model=replace(VQVAE2_BOTTOM.model, shape=(128, 128), cond_shape=(64, 64)),
    **{**PRIOR_TRAINING, "batch_size": PRIOR_TRAINING["batch_size"] // 4},
)


def narrower(paper: Preset) -> Preset:
    """A paper prior at a fraction of its size, with the same grids, codebooks, conditioning and
    training: 256 channels, 5 blocks x 4 gated resnets (the top one with an attention block after
    each), no residual units or output stack."""
    model = replace(paper.model, channels=256, res_channels=None, n_blocks=5, n_res_blocks=4, streams="auto",
                    out_res_blocks=0)
    return replace(paper, model=model)


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
    # the largest model that learns usefully in minutes on 2 CPU cores: 1,000-1,400 steps in ten
    # minutes, so a short Polyak average (else the average still holds much of the initial weights)
    # and a higher learning rate, chosen at that length on two kinds of photos (bench/results/recipe.md)
    "cpu-small": Preset(
        model=PixelSNAILConfig(
            shape=(32, 32), channels=64, n_blocks=2, n_res_blocks=2, dropout=0.0, n_mixtures=5,
            key_channels=16, value_channels=32,
        ),
        **{**CPU_TRAINING, "ema_decay": 0.98, "lr": 4e-3},
    ),
    "vqvae2-top": VQVAE2_TOP,
    "vqvae2-bottom": VQVAE2_BOTTOM,
    "vqvae2-top-256ch": narrower(VQVAE2_TOP),
    "vqvae2-bottom-256ch": narrower(VQVAE2_BOTTOM),
    "vqvae2-ffhq-top": VQVAE2_FFHQ_TOP,
    "vqvae2-ffhq-middle": VQVAE2_FFHQ_MIDDLE,
    "vqvae2-ffhq-bottom": VQVAE2_FFHQ_BOTTOM,
    # small priors that learn in minutes on 2 CPU cores
    "cpu-top": Preset(
        model=PixelSNAILConfig(
            shape=(8, 8), n_codes=256, channels=64, n_blocks=2, n_res_blocks=2, kernel_size=3,
            attention=True, n_heads=2, key_channels=16, value_channels=32, dropout=0.1,
            embed_channels=32, cond_channels=32,
        ),
        **CPU_TRAINING,
    ),
    "cpu-bottom": Preset(
        model=PixelSNAILConfig(
            shape=(16, 16), n_codes=256, cond_codes=256, cond_shape=(8, 8), channels=64, n_blocks=2,
            n_res_blocks=2, kernel_size=3, attention=False, dropout=0.1, embed_channels=32,
            cond_channels=64, cond_res_blocks=2,
        ),
        **CPU_TRAINING,
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
