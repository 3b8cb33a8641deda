"""Train the two-level VQ-VAE (VQ-VAE-2, EMA codebooks) on an image folder, CIFAR-10, ImageNet 32 or built-in photos.

Runs as `python scripts/train_vqvae.py ...` or `accelerate launch scripts/train_vqvae.py ...`
(on CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`).
"""

import argparse

from pipelines.cli import HelpFormatter, add_run_arguments, run
from pipelines.train_vqvae import PRESETS, VQVAETrainConfig, train


def parse_args():
    d = VQVAETrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=d.data, help="'builtin' (crops of scikit-image's sample photos), "
                   "a CIFAR-10 tarball/folder, an ImageNet 32x32 npz file/folder, or an image folder")
    p.add_argument("--out", default=d.out, help="run directory (checkpoint, reconstructions, log)")
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS),
                   help="vqvae2: the paper's model (codebooks 512 x 64); cpu-small: a quick CPU model")
    p.add_argument("--size", type=int, default=d.size, help="image side (multiple of 8): 256 gives 32x32 top, 64x64 bottom codes")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--n-images", type=int, default=d.n_images, help="test images in reconstructions.png")
    add_run_arguments(p, d)
    return p.parse_args()


def main():
    train(VQVAETrainConfig(**vars(parse_args())))


if __name__ == "__main__":
    run(main)
