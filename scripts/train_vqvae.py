"""Train the two-level VQ-VAE (VQ-VAE-2, EMA codebooks) on an image folder, CIFAR-10, ImageNet 32 or built-in photos.

Runs as `python scripts/train_vqvae.py ...` or `accelerate launch scripts/train_vqvae.py ...`
(on CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`).
Presets: vqvae2, the paper's model (codebooks 512 x 64, the default); cpu-small, a quick CPU model.
"""

import argparse

from pipelines.cli import HelpFormatter, add_run_arguments, add_run_setting, run
from pipelines.train_vqvae import VQVAETrainConfig, train
from vqvae.presets import PRESETS


def parse_args():
    d = VQVAETrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_run_setting(p, "--data", help="'builtin' (crops of scikit-image's sample photos, the default), "
                    "a CIFAR-10 tarball/folder, an ImageNet 32x32 npz file/folder, or an image folder")
    p.add_argument("--out", default=d.out, help="run directory (checkpoint, reconstructions, log)")
    add_run_setting(p, "--size", type=int, help="image side, a multiple of 8 (default 256: 32x32 top, 64x64 bottom codes)")
    add_run_arguments(p, d, PRESETS)
    p.add_argument("--n-images", type=int, default=d.n_images, help="test images in reconstructions.png")
    return p.parse_args()


def main():
    train(VQVAETrainConfig(**vars(parse_args())))


if __name__ == "__main__":
    run(main)
