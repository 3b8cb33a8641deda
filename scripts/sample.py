"""Sample images from the VQ-VAE-2 pipeline: top codes, each level below given the one above, decoded.

  python scripts/sample.py --vqvae runs/vqvae --top runs/top --bottom runs/bottom --n 16 --label 3 --out samples.png
  # a three-level VQ-VAE (FFHQ 1024): one prior per level, top first
  python scripts/sample.py --vqvae runs/vqvae --priors runs/top runs/middle runs/bottom --n 4 --out faces.png
  # 50 samples of every class, one PNG each and samples.npz, on 4 GPUs (resumable: run it again after a kill)
  accelerate launch --num_processes 4 scripts/sample.py --vqvae runs/vqvae --top runs/top --bottom runs/bottom \\
      --label all --n 50 --batch-size 32 --out-dir runs/samples
  # two processes on a CPU-only machine
  accelerate launch --multi_gpu --num_processes 2 scripts/sample.py ... --out-dir runs/samples

--vqvae, --top and --bottom take run directories (their latest checkpoint) or checkpoint files;
--priors takes one per level of the VQ-VAE, top first, instead of --top --bottom (any number of
levels). They must belong together: each prior trained on codes of that VQ-VAE checkpoint, at its
level. Runs on CUDA when there is one (--device chooses), under bf16 autocast where the device
computes bf16 natively (--precision; the priors' softmax is always fp32). Sample i draws from random numbers
of (--seed, i) alone: the same seed gives the same samples whatever --batch-size and the number of
processes (up to rounding: see docs/sampling.md). --batch-size auto picks the largest batch whose
caches fit the free memory; --capture replays each step as a CUDA graph.

--out-dir writes one PNG per sample ({index:06d}_label{label}.png), samples.npz (uint8 images
(N, S, S, 3), each level's codes: top_codes, [middle_codes,] bottom_codes, and labels) and
fid_images.npz (the images as arr_0, what FID evaluators read); a re-run skips the samples
already written. --save-codes holds the same code arrays.
--out writes them as one grid (one row per class when there are several); without --out-dir it
is written by default (samples.png), and only then may --save-codes be given.

--temperature, --top-k, --top-p and --guidance apply to every prior, in that order on the logits:
guidance combines the conditional and the null-class logits (one batch of twice the size), then
the temperature divides them and top-k / top-p keep the most likely codes.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse
import math

import torch
from safetensors.torch import save_file

from pipelines.cli import add_config_options, add_model_options, chosen_model, label_option, options_of, run, user_path
from pipelines.device import add_runtime_arguments, make_runtime
from pipelines.infer.generation import (ALL, SampleJob, check_drawing, load_pipeline, parse_label, plan_batch_size,
                                        read_label)
from pipelines.infer.sample_jobs import sample_in_memory, sample_to_directory
from pipelines.store.checkpoint import write_image_grid
from pipelines.store.outputs import check_output, output_file
from pipelines.store.samples import code_names
from prior.drawing import Drawing

LABEL_FORMS = ("class", "list", ALL)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, pixel_model=False, required=True, levels=True)
    p.add_argument("--n", type=int, default=16, help="number of samples of each class given (default 16)")
    label_option(p, LABEL_FORMS, "class of the samples, needed by class-conditional priors")
    p.add_argument("--batch-size", type=batch_size_option, default=16,
                   help="samples drawn together per process, or auto: the largest batch whose sampling caches fit "
                   "the free memory (the plan is printed) (default 16)")
    add_config_options(p, Drawing)
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' random numbers (default 0)")
    p.add_argument("--out", type=user_path, default=None, help="image grid to write (default samples.png without --out-dir)")
    p.add_argument("--out-dir", type=user_path, default=None, help="directory for one PNG per sample and samples.npz (resumable)")
    p.add_argument("--save-codes", type=user_path, default=None, help="also write the sampled codes here (.safetensors)")
    p.add_argument("--capture", action="store_true",
                   help="replay each sampling step as a CUDA graph, captured once per prior (CUDA only): "
                   "no launch overhead per step")
    add_runtime_arguments(p)
    return p.parse_args()


def batch_size_option(value):
    """--batch-size: a number, or auto (checked in check_args, so that the refusal is one line)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or auto, got {value!r}") from None


def check_args(args):
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.batch_size != "auto" and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    args.drawing = options_of(Drawing, args)
    parse_label(args.label, LABEL_FORMS)
    if args.out_dir is not None and args.save_codes is not None:
        raise ValueError("--save-codes goes without --out-dir: samples.npz holds the codes")
    if args.out_dir is None and args.out is None:
        args.out = "samples.png"
    for option, path, suffixes in (("--out", args.out, (".png",)), ("--save-codes", args.save_codes, (".safetensors",))):
        if path is not None:
            check_output(path, option, suffixes)
    if args.out_dir is not None:
        check_output(args.out_dir, "--out-dir", directory=True)


INTERRUPTED = "interrupted"
INTERRUPTED_DIR = ("interrupted: the samples written to --out-dir are kept; run the same command again to resume "
                   "after them")


def main(args):
    check_args(args)
    runtime = make_runtime(args.device, args.precision)
    vqvae_path, *prior_paths = chosen_model(args, instead=None)
    pipeline = load_pipeline(vqvae_path, *prior_paths).to(runtime)
    check_drawing(pipeline, args.drawing)
    labels = read_label(args.label, LABEL_FORMS, pipeline.n_classes)
    job = SampleJob(labels if isinstance(labels, tuple) else (labels,), args.n, args.seed, args.drawing, args.capture)
    if args.capture and runtime.device.type != "cuda":
        raise ValueError(f"--capture replays CUDA graphs: it needs --device cuda (this run is on {runtime.device.type})")
    if args.batch_size == "auto":
        args.batch_size, plan = plan_batch_size(pipeline.by_level, runtime, job)
        if runtime.processes.is_main_process:
            print(plan)
    if args.out_dir is None:
        samples = sample_in_memory(pipeline, runtime, job, args.batch_size)
    else:
        paths = {"vqvae": vqvae_path, **dict(zip(pipeline.levels, prior_paths))}
        samples = sample_to_directory(pipeline, runtime, job, paths, args.out_dir, args.batch_size,
                                      read_back=bool(args.out))
    if samples is None:  # not the main process
        return
    if args.out:
        write_grid(samples, job, args.out)
    if args.save_codes:
        with output_file(args.save_codes) as tmp:  # checked before the work, with --out
            save_file({name: torch.from_numpy(samples[name].astype("int64"))
                       for name in code_names(len(pipeline.priors))}, tmp)
    where = ", ".join(str(path) for path in (args.out_dir, args.out) if path)
    print(f"wrote {job.total} samples ({pipeline.image_size}x{pipeline.image_size}) to {where}")


def write_grid(samples, job, path):
    """The samples as one image: a row per class when there are several, else a square-ish grid."""
    images = torch.from_numpy(samples["images"]).permute(0, 3, 1, 2) / 127.5 - 1
    columns = job.per_label if len(job.labels) > 1 else math.ceil(math.sqrt(job.total))
    write_image_grid(images, path, nrow=columns)


if __name__ == "__main__":
    arguments = parse_args()
    run(lambda: main(arguments), interrupted=INTERRUPTED_DIR if arguments.out_dir else INTERRUPTED)
