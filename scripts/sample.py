"""Sample images from the VQ-VAE-2 pipeline: top codes, then bottom codes given them, decoded.

  python scripts/sample.py --vqvae runs/vqvae --top runs/top --bottom runs/bottom --n 16 --label 3 --out samples.png

--vqvae, --top and --bottom take run directories (their latest checkpoint) or checkpoint files.
The three must belong together: the priors trained on codes of that VQ-VAE checkpoint.
Runs on CUDA when there is one (--device chooses), under bf16 autocast where the device computes
bf16 natively (--precision; the priors' softmax is always fp32).
"""

import argparse

import torch
from safetensors.torch import save_file

from pipelines.checkpoint import atomic_path, write_image_grid
from pipelines.cli import run
from pipelines.generation import generate, load_pipeline
from pipelines.inference import add_runtime_arguments, make_runtime


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqvae", required=True, help="VQ-VAE run directory or checkpoint")
    p.add_argument("--top", required=True, help="top prior run directory or checkpoint")
    p.add_argument("--bottom", required=True, help="bottom prior run directory or checkpoint")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--label", type=int, default=None, help="class of every sample (needed by class-conditional priors)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of both priors (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--out", default="samples.png", help="image grid to write (default samples.png)")
    p.add_argument("--save-codes", default=None, help="also write the sampled codes here (.safetensors)")
    add_runtime_arguments(p)
    return p.parse_args()


def main():
    args = parse_args()
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    runtime = make_runtime(args.device, args.precision)
    pipeline = load_pipeline(args.vqvae, args.top, args.bottom).to(runtime)
    generator = torch.Generator(runtime.device).manual_seed(args.seed)
    with runtime.autocast():
        images, top_codes, bottom_codes = generate(pipeline, args.n, args.label, args.temperature, generator,
                                                   progress=True)
    images, top_codes, bottom_codes = images.float().cpu(), top_codes.cpu(), bottom_codes.cpu()
    write_image_grid(images, args.out)
    if args.save_codes:
        with atomic_path(args.save_codes) as tmp:
            save_file({"top_codes": top_codes.contiguous(), "bottom_codes": bottom_codes.contiguous()}, tmp)
    print(f"wrote {args.n} samples ({pipeline.image_size}x{pipeline.image_size}) to {args.out}")


if __name__ == "__main__":
    run(main)
