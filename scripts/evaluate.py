"""Exact test bits/dim of a PixelSNAIL checkpoint (its EMA weights) over a whole data split.

The last line printed is `test bits/dim: X.XXXX`.
"""

import argparse

from torch.utils.data import DataLoader

from pipelines import runtime
from pipelines.checkpoint import load_pixelsnail
from pipelines.cli import run
from pipelines.data import load_dataset
from pipelines.train_pixel import evaluate_bits


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run directory (its model.safetensors) or a checkpoint file")
    p.add_argument("--data", required=True, help="the dataset, as given to the trainer ('builtin' included)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"],
                   help="the network's precision; the likelihood itself is always fp32")
    return p.parse_args()


def main():
    args = parse_args()
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, extra = load_pixelsnail(args.ckpt)
    if not model.config.pixel_mode:
        raise ValueError(f"{args.ckpt} is a code-mode prior; bits/dim over images needs a pixel-mode model")
    accelerator = runtime.make_accelerator(runtime.resolve_precision(args.precision))
    dataset = load_dataset(args.data, args.split, model.config.shape[0])
    loader = accelerator.prepare(DataLoader(dataset, batch_size=args.batch_size))
    model = model.to(accelerator.device)
    bits = evaluate_bits(model, loader, accelerator, desc=args.split)
    accelerator.print(f"{len(dataset)} images, checkpoint step {extra.get('step', '?')}")
    accelerator.print(f"{args.split} bits/dim: {bits:.4f}")


if __name__ == "__main__":
    run(main)
