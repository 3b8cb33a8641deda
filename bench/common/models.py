"""Inputs and models several benchmarks build: random images and model inputs, the other photo the
codec benchmarks hold out, the precision a variant runs in, and the quick (tiny) VQ-VAE of --quick
runs with its extraction step."""

import torch

from vqvae import VQVAE2Config

# a VQ-VAE-2 small enough for a smoke run of seconds
VQVAE_QUICK_MODEL = VQVAE2Config(channels=16, res_channels=8, n_res_blocks=1, top_codes=16, bottom_codes=16, code_dim=8)


def random_pixels(batch_size, shape, generator=None):
    """Images on the 256-value grid of [-1, 1], like the data loader produces."""
    return torch.randint(0, 256, (batch_size, 3, *shape), generator=generator) / 127.5 - 1


def random_inputs(config, batch_size, generator):
    """(x, label, cond) of a PixelSNAIL of `config`, random; label and cond None where the model takes none."""
    if config.pixel_mode:
        x = random_pixels(batch_size, config.shape, generator)
    else:
        x = torch.randint(0, config.n_codes, (batch_size, *config.shape), generator=generator)
    label = torch.randint(0, config.n_classes, (batch_size,), generator=generator) if config.n_classes else None
    cond = None
    if config.cond_codes is not None:
        cond = torch.randint(0, config.cond_codes, (batch_size, *config.cond_shape), generator=generator)
    return x, label, cond


def default_other_photos():
    """matplotlib's sample photo (a portrait, 512x600), installed with matplotlib: no download."""
    from matplotlib import cbook

    return [str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]


def autocast(precision):
    """bf16 autocast on the CPU for "bf16", nothing for "fp32"."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def channels_last(model, x):
    """The model and its input in the channels_last memory format."""
    return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def vqvae_extract(model, x, precision):
    """(top codes, bottom codes) of a batch: eval mode, no gradients, as code extraction runs."""
    with torch.no_grad(), autocast(precision):
        return model.encode(x)
