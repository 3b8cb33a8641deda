"""Per-image likelihood scores, and where in the image the bits are spent.

- A pixel-space PixelSNAIL scores an image by its bits/dim, and by the bits at each pixel (its
  three values together: -log2 P(pixel | the pixels before it)).
- The VQ-VAE-2 pipeline encodes the image (the codes of every level, as extract_codes.py does) and
  scores it by each level's bits per code: the top prior's, then each prior below given the codes
  of the level above it (two levels: the bottom given the top); the bits at each code position of
  every grid, and the VQ-VAE's reconstruction error (mean squared error, images in [-1, 1]).

The per-image bits/dim (per code) given a class is `PixelSNAIL.output_nll`, the function that
evaluate.py and the trainers average, so the mean over a split is their figure. A map sums to the
image's total bits.

Classes. A class-conditional model scores an image given a class (`labels`, one per image), or,
with `MIXTURE`, with the class unknown: p(x) = mean over classes c of p(x | c), a uniform prior
over the classes (the built-in crops' classes are equally frequent). The bits at position i are
then -log2 p(x_i | x_<i) under that mixture, where the classes are weighed by their posterior given
x_<i, so they still sum to -log2 p(x); in the pipeline the positions run through the top grid, then
each grid below it, and a level's bits are -log2 p(its codes | the codes above).
"""

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipelines.data.datasets import to_model_range
from pipelines.infer.generation import DATA, MIXTURE, check_labels_given, parse_label
from pipelines.infer.heatmaps import write_heat_map
from pipelines.store.outputs import output_file
from prior import PixelSNAIL

LABEL_FORMS = ("class", DATA, MIXTURE)  # what --label takes (pipelines.infer.generation.parse_label)


class Level(NamedTuple):
    """One factor of an image's likelihood: a model, its input and its spatial condition."""

    name: str  # "pixels", or the level's name (modelkit.level_names): "top", "middle", "bottom"
    model: PixelSNAIL
    x: Tensor  # (B, 3, H, W) pixels in [-1, 1] or (B, H, W) codes
    cond: Tensor | None  # the codes of the level it is conditioned on


@dataclass
class LevelScore:
    name: str
    bits: Tensor  # (B,) bits per dimension (pixels: per sub-pixel) or per code
    bits_map: Tensor  # (B, H, W) bits at each position, fp32; a map sums to bits x dimensions

    @property
    def total_bits(self) -> Tensor:
        return self.bits_map.sum(dim=(1, 2))


@dataclass
class BatchScores:
    levels: list[LevelScore]
    reconstruction_mse: Tensor | None = None  # (B,), the pipeline's


def dims_per_position(model) -> int:
    return 3 if model.config.pixel_mode else 1


@torch.no_grad()
def score_levels(levels: list[Level], labels) -> list[LevelScore]:
    """Scores of each level given `labels`: (B,) classes, None (unconditional models) or MIXTURE."""
    if isinstance(labels, str) and labels == MIXTURE:
        return mixture_scores(levels)
    scores = []
    for name, model, x, cond in levels:
        out = model(x, labels, cond)
        scores.append(LevelScore(name, model.output_nll(x, out), model.output_bits_map(x, out)))
    return scores


def mixture_scores(levels: list[Level]) -> list[LevelScore]:
    """Scores under the uniform mixture over the models' classes (see the module docstring)."""
    n_classes = levels[0].model.config.n_classes
    batch = levels[0].x.shape[0]
    per_class = []
    for label in range(n_classes):
        labels = torch.full((batch,), label, dtype=torch.long, device=levels[0].x.device)
        maps = [model.output_bits_map(x, model(x, labels, cond)) for _, model, x, cond in levels]
        per_class.append(torch.cat([m.flatten(1) for m in maps], dim=1))  # (B, N): all levels' positions in order
    log_joint = mixture_log_prefix(torch.stack(per_class))  # (B, N)
    bits = (F.pad(log_joint, (1, 0))[:, :-1] - log_joint) / math.log(2)  # -log2 p(x_i | x_<i)
    scores, start = [], 0
    for name, model, x, _ in levels:
        shape = model.config.shape
        bits_map = bits[:, start : start + math.prod(shape)].reshape(batch, *shape).float()
        start += math.prod(shape)
        dims = math.prod(shape) * dims_per_position(model)
        scores.append(LevelScore(name, bits_map.sum(dim=(1, 2)) / dims, bits_map))
    return scores


def mixture_log_prefix(bits: Tensor) -> Tensor:
    """bits (C, B, N) at each position given each of C classes -> (B, N) log p(x_<=i) in nats under
    the uniform mixture of the classes, in float64 (the prefix sums run to thousands of bits)."""
    log_prefix = -(bits.double() * math.log(2)).cumsum(dim=2)  # log p(x_<=i | c)
    return torch.logsumexp(log_prefix, dim=0) - math.log(bits.shape[0])


@torch.no_grad()
def score_pixels(model, images: Tensor, labels, runtime) -> BatchScores:
    """uint8 images (B, 3, S, S) -> their scores under a pixel-space PixelSNAIL on `runtime`."""
    x = to_model_range(images.to(runtime.device))
    with runtime.autocast():
        return BatchScores(score_levels([Level("pixels", model, x, None)], labels))


@torch.no_grad()
def score_pipeline(pipeline, images: Tensor, labels, runtime) -> BatchScores:
    """uint8 images (B, 3, S, S) -> their codes' scores under the prior of every level (each level's
    given the codes of the level above it), and the VQ-VAE's reconstruction error, on `runtime`."""
    x = runtime.images(images)
    with runtime.autocast():
        grids = pipeline.vqvae.encode(x)  # one (B, h, w) per level, top first
        reconstruction = pipeline.vqvae.decode_codes(*grids)
        aboves = (None, *grids[:-1])  # the top prior has no codes to condition on
        levels = [Level(*level) for level in zip(pipeline.levels, pipeline.priors, grids, aboves)]
        scores = score_levels(levels, labels)
    mse = (reconstruction.float() - x.float()).square().mean(dim=(1, 2, 3))
    return BatchScores(scores, mse)


# -- which class an image is scored with ---------------------------------------------------------


def choose_labels(option: str | None, n_classes: int, dataset_classes: int, source: str):
    """--label as given -> None (an unconditional model), MIXTURE, an int (every image's class) or
    "data" (each image's class in its dataset), refusing what does not fit in one line.
    `dataset_classes`: the largest label of the images + 1 (pipelines.infer.extract.count_classes), 0 or 1
    where they have no classes.

    Default: "data" where the images come with classes (a dataset spec with labels), else refused:
    loose files have no class, and guessing one would score them under the wrong model."""
    if not n_classes:
        check_labels_given(option, n_classes, "the model is")
        return None
    chosen = DATA if option is None else parse_label(option, LABEL_FORMS, n_classes)
    if chosen == DATA:
        advice = f"give --label N (a class in [0, {n_classes})) or --label {MIXTURE} (the class unknown)"
        if dataset_classes <= 1:
            raise ValueError(f"the model is class-conditional ({n_classes} classes) and {source} has no classes: {advice}")
        if dataset_classes > n_classes:
            raise ValueError(f"{source} has labels up to {dataset_classes - 1} but the model knows {n_classes} "
                             f"classes: {advice}")
    return chosen


def batch_labels(chosen, labels: Tensor, device):
    """The labels to score a batch with, from choose_labels' answer and the batch's own labels."""
    if chosen is None or chosen == MIXTURE:
        return chosen
    if chosen == DATA:
        return labels.to(device)
    return torch.full_like(labels, chosen).to(device)


# -- a scoring job: every image of a dataset into a CSV, and heat maps ---------------------------


def column_names(scores: BatchScores) -> list[str]:
    names = [f"{level.name}_bits_per_code" if level.name != "pixels" else "bits_per_dim" for level in scores.levels]
    names.append("total_bits")
    return names + (["reconstruction_mse"] if scores.reconstruction_mse is not None else [])


def rows_of(scores: BatchScores) -> list[list[float]]:
    """One row of numbers per image, in column_names' order."""
    columns = [level.bits for level in scores.levels]
    columns.append(sum(level.total_bits for level in scores.levels))
    if scores.reconstruction_mse is not None:
        columns.append(scores.reconstruction_mse)
    return torch.stack([column.double().cpu() for column in columns], dim=1).tolist()


def map_panels(scores: BatchScores, index: int) -> list[tuple[str, Tensor]]:
    """The heat-map panels of image `index` of a batch: one per level, titled with its score."""
    unit = {"pixels": "dim"}
    return [(f"{level.name}: {float(level.bits[index]):.3f} bits/{unit.get(level.name, 'code')}", level.bits_map[index])
            for level in scores.levels]


def label_text(chosen, label: int) -> str:
    if chosen is None:
        return ""
    return MIXTURE if chosen == MIXTURE else str(label if chosen == DATA else chosen)


def map_name(row: int, name: str, from_files: bool) -> str:
    """The heat map of CSV row `row` (0-based): `000007.png`, or `000007_<file stem>.png` for files."""
    return f"{row:06d}_{Path(name).stem}.png" if from_files else f"{row:06d}.png"


def score_dataset(score, dataset, names, chosen, csv_path, maps_dir=None, batch_size=32, device="cpu", progress=True):
    """Scores every image of `dataset` ((uint8 image, label) items) in batches: `score(images,
    labels)` -> BatchScores (score_pixels or score_pipeline with its model and runtime bound). Writes
    one CSV row per image (`image`: names[i], `label`: the class it was scored with, then the
    scores), atomically, and with `maps_dir` one heat-map PNG per row. -> {column: mean}."""
    from_files = not all(name.isdigit() for name in names)
    loader = DataLoader(dataset, batch_size=batch_size)
    sums, row = {}, 0
    bar = tqdm(total=len(dataset), unit="img", desc="scoring", disable=not progress)
    with output_file(csv_path) as tmp, open(tmp, "w", newline="") as file, bar:
        writer = csv.writer(file)
        for images, labels in loader:
            scores = score(images, batch_labels(chosen, labels, device))
            columns = column_names(scores)
            if row == 0:
                writer.writerow(["image", "label", *columns])
            for k, values in enumerate(rows_of(scores)):
                writer.writerow([names[row], label_text(chosen, int(labels[k])), *values])
                for column, value in zip(columns, values):
                    sums[column] = sums.get(column, 0.0) + value
                if maps_dir is not None:
                    write_heat_map(Path(maps_dir) / map_name(row, names[row], from_files), images[k],
                                   map_panels(scores, k), title=names[row] if from_files else f"image {names[row]}")
                row += 1
            bar.update(len(images))
    return {column: total / row for column, total in sums.items()}
