"""Train pixel-space PixelSNAIL on CIFAR-10, ImageNet 32x32, an image folder or built-in photos.

Runs as `python scripts/train_pixelsnail.py ...` or `accelerate launch scripts/train_pixelsnail.py ...`
(on CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`).
"""

import argparse

from pipelines.cli import HelpFormatter, add_pixelsnail_arguments, add_run_arguments, add_run_setting, run
from pipelines.train_pixel import TrainConfig, train
from prior import PRESETS


def parse_args():
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_run_setting(p, "--data", help="'builtin' (crops of scikit-image's sample photos, the default), "
                    "a CIFAR-10 tarball/folder, an ImageNet 32x32 npz file/folder, or an image folder")
    p.add_argument("--out", default=d.out, help="run directory (checkpoints, samples, log)")
    add_run_arguments(p, d, PRESETS)
    add_pixelsnail_arguments(p)
    p.add_argument("--n-samples", type=int, default=d.n_samples, help="samples drawn into samples.png at the end")
    return p.parse_args()


def main():
    train(TrainConfig(**vars(parse_args())))


if __name__ == "__main__":
    run(main)
