"""Completion: keep the top rows of an image exactly and sample the rest, n times.

A pixel model keeps the pixel rows themselves: the samplers' prefix (prior.sampling) holds them
and sampling starts after them. The VQ-VAE-2 pipeline encodes the image, keeps at each level the
code rows that cover the kept image rows (a code row covers image_size / grid_height image rows,
so ceil(rows * grid_height / image_size) of them), samples the rest of the top grid, then the
rest of each grid below given the whole grid above it, and decodes. Its kept rows are the VQ-VAE's
reconstruction of the kept part, not the pixels themselves.

Example:
    >>> completions = complete_pixels(model, image, rows=16, n=4, generator=torch.Generator().manual_seed(0))
    >>> completions.shape   # (4, 3, 32, 32), completions[:, :, :16] == image[:, :16] in [-1, 1]
"""

import math

import torch
from einops import repeat

from pipelines.infer.generation import Known, generate
from prior.drawing import Drawing


def kept_rows(keep: str, height: int) -> int:
    """--keep as given: a fraction of the rows (a number in [0, 1], e.g. 0.5) or a whole row count
    in [2, height] -> the number of rows kept (a fraction's rows rounded down).

    1 is the fraction, the whole image, as 1.0 is: a number means one thing however it is written
    (one row is the fraction 1/height)."""
    try:
        value = float(keep)
    except ValueError:
        raise ValueError(f"--keep must be a fraction of the rows (0.5) or a row count (16), got {keep!r}") from None
    if 0 <= value <= 1:  # nan fails this
        return math.floor(value * height)
    if not (keep.strip().lstrip("+").isdigit() and value <= height):
        raise ValueError(f"--keep must be a fraction of the rows in [0, 1] (1: the whole image) or a whole row count "
                         f"in [2, {height}] (the image's rows), got {keep}")
    return int(value)


def covering_rows(image_rows: int, image_size: int, grid_height: int) -> int:
    """The code rows of a grid of `grid_height` rows over `image_size` image rows that cover the
    first `image_rows` image rows."""
    return math.ceil(image_rows * grid_height / image_size)


def with_rest_blank(image, rows):
    """(3, H, W) in [-1, 1] -> the same with rows `rows` on grey (0), the picture of what is kept."""
    blank = image.clone()
    blank[:, rows:] = 0
    return blank


@torch.no_grad()
def complete_pixels(model, image, rows, n, label=None, generator=None, progress=False):
    """(3, H, W) image in [-1, 1] -> (n, 3, H, W) completions whose first `rows` rows are the image's."""
    prefix = repeat(image, "c h w -> n c h w", n=n)
    labels = None if label is None else torch.full((n,), label, dtype=torch.long, device=image.device)
    return model.sample(n, labels, None, generator, progress=progress, prefix=prefix, kept=rows * image.shape[2])


@torch.no_grad()
def complete_codes(pipeline, image, rows, n, label=None, drawing=Drawing(), generator=None, progress=False):
    """(3, S, S) image in [-1, 1] -> (n, 3, S, S) decoded completions, then the codes of every level
    top first, which keep the image's codes in the rows covering its first `rows` rows."""
    grids = pipeline.vqvae.encode(image[None])  # one (1, h, w) per level, top first
    known = Known(tuple(repeat(grid[0], "h w -> n h w", n=n) for grid in grids),
                  tuple(covering_rows(rows, pipeline.image_size, grid.shape[1]) * grid.shape[2] for grid in grids))
    return generate(pipeline, n, label, drawing, generator, progress, known)
