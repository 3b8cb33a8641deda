"""The pixel-model benchmarks' training runs and the crops they score them on: a run of the real
trainer to a mark, the held-out split and crops of other photos (cut as the built-in crops are
cut), and the run's exact bits/dim on both."""

import csv
import statistics

import numpy as np
import skimage.data
import torch
from PIL import Image

from bench.common.processes import last_line_value, run_script
from pipelines.data.datasets import BUILTIN_DEFAULT_COUNTS, load_dataset, random_crops, to_rgb8

OTHER_CROPS = 1000  # crops of the other photos a benchmark scores
CROP_SEED = 123  # the other photos' crops are the same in every run
# scikit-image's greyscale photos: data of another kind than the built-in colour photos
GREY_PHOTOS = {"train": ("camera", "brick", "grass", "coins", "moon", "cell"), "test": ("gravel", "clock")}
GREY_DATA = "grey photos"  # how results files name that data (it is written to a temporary folder)


def train_pixel_run(run_dir, *options, resume=False):
    """scripts/train_pixelsnail.py --out run_dir with the trainer `options` (data, seed, budget, ...),
    its periodic evaluations, checkpoints and samples off (the benchmark scores the end itself);
    `resume` continues the run in run_dir (exact resume: one run stopped at several marks)."""
    run_script("scripts/train_pixelsnail.py", "--out", str(run_dir), *options, "--eval-every", str(10**9),
               "--checkpoint-every", str(10**9), "--n-samples", "0", *(["--resume"] if resume else []))


def test_images(data, size):
    """The test split of `data` as uint8 (N, 3, S, S), as the model is evaluated on it."""
    dataset = load_dataset(data, "test", size)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def photo_crops(photos, n, size, seed=CROP_SEED):
    """`n` random crops of the photos (each from a photo chosen at random), uint8 (n, 3, S, S)."""
    return random_crops([to_rgb8(Image.open(photo)) for photo in photos], n, size, np.random.default_rng(seed))[0]


def write_pngs(images, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{k:05d}.png")


def grey_photo(name):
    """scikit-image's greyscale photo `name` as an RGB PIL image."""
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def write_grey_folder(folder, size, n=None):
    """An image folder (train/, test/) of crops of GREY_PHOTOS as RGB PNGs, cut as the built-in crops:
    as many as the built-in data has per split, or `n`."""
    for split, names in GREY_PHOTOS.items():
        count = n or BUILTIN_DEFAULT_COUNTS[split]
        crops = random_crops([grey_photo(name) for name in names], count, size,
                             np.random.default_rng(["train", "test"].index(split)))[0]
        write_pngs(crops, folder / split)
    return folder


def run_bits(run_dir, eval_data, other_folder, work):
    """A pixel run's test bits/dim on `eval_data`'s test split (scripts/evaluate.py) and its mean
    bits/dim on the PNGs in `other_folder` (scripts/score.py), both exact, in fp32."""
    output = run_script("scripts/evaluate.py", "--ckpt", str(run_dir), "--data", eval_data, "--precision", "fp32")
    scores = work / "other-scores.csv"
    run_script("scripts/score.py", "--ckpt", str(run_dir), "--precision", "fp32", "--out", str(scores), str(other_folder))
    with scores.open() as file:
        other = [float(row["bits_per_dim"]) for row in csv.DictReader(file)]
    return last_line_value(output, "test bits/dim: "), statistics.fmean(other)
