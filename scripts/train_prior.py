"""Train a VQ-VAE-2 prior: PixelSNAIL over the top or bottom code grid of a code database.

  accelerate launch scripts/train_prior.py --codes codes.lmdb --level top --out runs/top
  accelerate launch scripts/train_prior.py --codes codes.lmdb --level bottom --out runs/bottom

The top prior is conditioned on the class label (when the database has labels); the bottom prior
on the top codes and the label. On CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`.
"""

import argparse

from pipelines.cli import run
from pipelines.train_prior import LEVELS, PriorTrainConfig, train
from prior import PRESETS


def parse_args():
    d = PriorTrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codes", required=True, help="code database written by scripts/extract_codes.py")
    p.add_argument("--level", default=d.level, choices=LEVELS)
    p.add_argument("--out", required=True, help="run directory (checkpoint, state, log)")
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS),
                   help=f"network settings (default {d.preset}); vqvae2-top / vqvae2-bottom follow the paper; "
                   "grid and codebook always come from the database")
    p.add_argument("--steps", type=int, default=d.steps, help=f"total optimizer steps of the run (default {d.steps})")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="stop and save after this long")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process (default: the preset's)")
    p.add_argument("--lr", type=float, default=d.lr, help="initial learning rate (default: the preset's)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="default: the preset's")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"max global gradient norm (default {d.grad_clip})")
    p.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"],
                   help="auto (default): bf16 autocast where the hardware has native bf16; the loss is always fp32")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help=f"steps between validations (default {d.eval_every})")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help=f"batches per periodic validation (default {d.eval_batches}; the final one uses all)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help=f"default {d.checkpoint_every}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    return p.parse_args()


def main():
    train(PriorTrainConfig(**vars(parse_args())))


if __name__ == "__main__":
    run(main)
