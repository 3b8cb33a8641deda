"""Exact test bits/dim of a PixelSNAIL checkpoint (its EMA weights) over a whole data split.

The last line printed is `test bits/dim: X.XXXX`. Runs on CUDA when there is one (--device chooses),
in fp32 by default (--precision auto: bf16 autocast where the device computes bf16 natively; the
likelihood itself is always fp32), and on several processes under `accelerate launch`, each evaluating a share.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse

from torch.utils.data import DataLoader

from pipelines import runtime
from pipelines.checkpoint import load_pixelsnail
from pipelines.cli import HelpFormatter, run, user_path
from pipelines.data import load_dataset
from pipelines.inference import add_runtime_arguments, resolve_device
from pipelines.train_pixel import evaluate_bits


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", type=user_path, required=True, help="a run directory (its model.safetensors) or a checkpoint file")
    p.add_argument("--data", type=user_path, required=True, help="the dataset, as given to the trainer ('builtin' included)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--batch-size", type=int, default=32)
    # fp32 by default: this is the figure quoted as exact (the trainers' final evaluation runs in fp32 too)
    add_runtime_arguments(p, precision_default="fp32", precision_note="; default fp32, the exact figure")
    return p.parse_args()


def main():
    args = parse_args()
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    precision = runtime.resolve_precision(args.precision, device)
    model, extra = load_pixelsnail(args.ckpt)
    if not model.config.pixel_mode:
        raise ValueError(f"{args.ckpt} is a code-mode prior; bits/dim over images needs a pixel-mode model")
    dataset = load_dataset(args.data, args.split, model.config.shape[0])
    # after every check: accelerate fixes one precision per Python process (tests run scripts in theirs)
    accelerator = runtime.make_accelerator(precision, device=device)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=args.batch_size))
    model = model.to(accelerator.device)
    accelerator.print(f"{accelerator.num_processes} process(es) on {device}, precision {precision}")
    bits = evaluate_bits(model, loader, accelerator, desc=args.split)
    accelerator.print(f"{len(dataset)} images, checkpoint step {extra.get('step', '?')}")
    accelerator.print(f"{args.split} bits/dim: {bits:.4f}")


if __name__ == "__main__":
    run(main)
