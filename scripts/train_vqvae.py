"""Train the two-level VQ-VAE (VQ-VAE-2, EMA codebooks) on an image folder, CIFAR-10, ImageNet 32 or built-in photos.

Runs as `python scripts/train_vqvae.py ...` or `accelerate launch scripts/train_vqvae.py ...`
(on CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`).
"""

import argparse

from pipelines.cli import run
from pipelines.train_vqvae import PRESETS, VQVAETrainConfig, train


def parse_args():
    d = VQVAETrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=d.data, help="'builtin' (crops of scikit-image's sample photos), "
                   "a CIFAR-10 tarball/folder, an ImageNet 32x32 npz file/folder, or an image folder")
    p.add_argument("--out", default=d.out, help="run directory (checkpoint, reconstructions, log)")
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS),
                   help="vqvae2: the paper's model (codebooks 512 x 64); cpu-small: a quick CPU model")
    p.add_argument("--size", type=int, default=d.size, help="image side (multiple of 8): 256 gives 32x32 top, 64x64 bottom codes")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps of the run")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="stop and save after this long")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm")
    p.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast where the hardware has native bf16; the quantizer is always fp32")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between test evaluations")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="test batches per periodic evaluation (the final one uses the whole split)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--n-images", type=int, default=d.n_images, help="test images in reconstructions.png")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    return p.parse_args()


def main():
    train(VQVAETrainConfig(**vars(parse_args())))


if __name__ == "__main__":
    run(main)
