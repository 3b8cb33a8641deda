"""Evaluate every stage offline, one command per stage; the last line printed is the stage's result.

  evaluate.py [pixels] --ckpt RUN --data DATA          exact test bits/dim of a pixel PixelSNAIL (its EMA
                                                       weights) over a whole split: `test bits/dim: X.XXXX`
  evaluate.py prior --ckpt RUN --codes codes.lmdb      a prior of any level on its code database: bits per
                                                       code on the held-out records (every 20th, as the
                                                       trainer holds them out) and on the training records:
                                                       `held-out bits/code: X (train Y, gap +Z)`; on another
                                                       database of its VQ-VAE, every record is held out:
                                                       `held-out bits/code: X (another database: ...)`
  evaluate.py vqvae --ckpt RUN --data DATA             reconstruction MSE, PSNR, SSIM on the test split, codebook
                                                       usage and perplexity per level:
                                                       `test reconstruction mse: X (PSNR Y dB, SSIM Z)`
  evaluate.py samples --vqvae V --top T --bottom B --data DATA
  evaluate.py samples --vqvae V --priors TOP [MIDDLE ...] BOTTOM --data DATA
                                                       Classification Accuracy Score of class-conditional samples
                                                       (a small classifier trained on them, tested on real
                                                       held-out images) beside the real-data ceiling, and FID /
                                                       KID in that classifier's feature space ("local"; never
                                                       comparable with Inception FID): `CAS: X (real-data ceiling Y)`.
                                                       --samples takes sample.py --out-dir's samples instead;
                                                       --inception-weights FILE adds the standard Inception FID.

Without a stage, the stage of what --ckpt holds (a pixel model, a prior or a VQ-VAE), as its
checkpoint records it. `--json FILE` files the stage's numbers as a flat object under the stage's
name (pixels, vqvae, top_prior, [middle_prior,] bottom_prior, samples) in FILE, keeping the other stages there: one
FILE per pipeline collects them all. Runs on CUDA when there is one
(--device chooses), in fp32 by default (--precision). pixels, prior and vqvae run on several
processes under `accelerate launch`, each evaluating a share; samples in one process.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse
import sys
import time

import torch
from torch.utils.data import DataLoader, Subset

from pipelines.cli import HelpFormatter, add_config_options, add_model_options, chosen_model, options_of, run, user_path
from pipelines.data.datasets import load_dataset
from pipelines.device import add_runtime_arguments, one_process_runtime, resolve_device, resolve_precision
from pipelines.eval import sample_metrics
from pipelines.eval.stages import evaluate_bits, evaluate_prior, evaluate_vqvae
from pipelines.infer.generation import load_pipeline
from pipelines.store.checkpoint import CheckpointError, checkpoint_stage, load_pixelsnail, load_vqvae
from pipelines.store.results import check_result_file, write_result
from pipelines.train import runtime
from prior.drawing import Drawing

STAGES = ("pixels", "prior", "vqvae", "samples")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in (*STAGES, "-h", "--help"):
        argv = [stage_of_checkpoint(argv), *argv]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", metavar="{" + ",".join(STAGES) + "}")
    add_pixels_arguments(stage_parser(stages, "pixels", "exact bits/dim of a pixel-space PixelSNAIL"))
    add_prior_arguments(stage_parser(stages, "prior", "bits per code of a prior, held-out and train"))
    add_vqvae_arguments(stage_parser(stages, "vqvae", "reconstruction and codebook use of a VQ-VAE"))
    add_samples_arguments(stage_parser(stages, "samples", "CAS and local FID / KID of a pipeline's samples"))
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def stage_of_checkpoint(argv):
    """The stage that evaluates the checkpoint --ckpt names, as it records it; `pixels` (the command
    before stages existed) when there is none to read, which then says what is wrong with it."""
    given = argparse.ArgumentParser(add_help=False)
    given.add_argument("--ckpt", type=user_path)
    ckpt = given.parse_known_args(argv)[0].ckpt
    try:
        stage = checkpoint_stage(ckpt) if ckpt else "pixels"
    except CheckpointError:
        return "pixels"
    return "prior" if stage.endswith("_prior") else stage if stage in STAGES else "pixels"


def stage_parser(stages, name, summary):
    p = stages.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
    p.add_argument("--json", type=user_path, default=None, metavar="FILE",
                   help="also file the numbers under the stage's name in this JSON file (other stages' kept)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images, records or samples (drawn together) per batch, per process")
    # fp32 by default: the figures quoted as exact (the trainers' final evaluation runs in fp32 too)
    add_runtime_arguments(p, precision_default="fp32", precision_note="; default fp32, the exact figure")
    return p


def add_pixels_arguments(p):
    p.add_argument("--ckpt", type=user_path, required=True, help="a run directory (its model.safetensors) or a checkpoint file")
    p.add_argument("--data", type=user_path, required=True, help="the dataset, as given to the trainer ('builtin' included)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="the split of --data evaluated")


def add_prior_arguments(p):
    p.add_argument("--ckpt", type=user_path, required=True, help="the prior's run directory or checkpoint file")
    p.add_argument("--codes", type=user_path, required=True,
                   help="a code database of the prior's VQ-VAE: the one it trained on (held-out and train figures), "
                   "or another (all its records held out)")
    p.add_argument("--max-records", type=int, default=None, help="at most this many records of each split (default all)")


def add_vqvae_arguments(p):
    p.add_argument("--ckpt", type=user_path, required=True, help="the VQ-VAE's run directory or checkpoint file")
    p.add_argument("--data", type=user_path, required=True, help="the dataset, as given to the trainer ('builtin' included)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="the split of --data evaluated")
    p.add_argument("--max-images", type=int, default=None, help="at most this many images (default the whole split)")


def add_samples_arguments(p):
    add_model_options(p, pixel_model=False, levels=True)
    p.add_argument("--samples", type=user_path, default=None,
                   help="instead of drawing: sample.py --out-dir's directory or its samples.npz (class-conditional)")
    p.add_argument("--data", type=user_path, required=True, help="the real data the pipeline was trained on")
    p.add_argument("--per-class", type=int, default=100,
                   help="samples drawn per class, and real images per class in each real set")
    p.add_argument("--classifier-steps", type=int, default=300, help="training steps of each small classifier")
    p.add_argument("--seed", type=int, default=0, help="of the samples, the real images chosen and the classifiers")
    add_config_options(p, Drawing, names=("temperature",))
    p.add_argument("--inception-weights", type=user_path, default=None, metavar="FILE",
                   help="Inception v3 FID weights you bring (pytorch-fid's pt_inception-2015-12-05-6726825d.pth): adds "
                   "the standard Inception FID; needs torch-fidelity; nothing is downloaded")


def stage_accelerator(args):
    """The Accelerator a stage that runs on several processes evaluates with, made after every check of
    the stage: accelerate fixes one precision per Python process (tests run scripts in theirs)."""
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    accelerator = runtime.make_accelerator(precision, device=device)
    accelerator.print(f"{accelerator.num_processes} process(es) on {device}, precision {precision}")
    return accelerator


def pixels(args):
    model, extra = load_pixelsnail(args.ckpt)
    if not model.config.pixel_mode:
        raise ValueError(f"{args.ckpt} is a code-mode prior; bits/dim over images needs a pixel-mode model")
    dataset = load_dataset(args.data, args.split, model.config.shape[0])
    accelerator = stage_accelerator(args)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=args.batch_size))
    model = model.to(accelerator.device)
    bits = evaluate_bits(model, loader, accelerator, desc=args.split)
    accelerator.print(f"{len(dataset)} images, checkpoint step {extra.get('step', '?')}")
    accelerator.print(f"{args.split} bits/dim: {bits:.4f}")
    return "pixels", {f"{args.split}_bits_per_dim": bits, "images": len(dataset), "step": extra.get("step")}, accelerator


def prior(args):
    if args.max_records is not None and args.max_records < 1:
        raise ValueError(f"--max-records must be >= 1, got {args.max_records}")
    accelerator = stage_accelerator(args)
    result = evaluate_prior(args.ckpt, args.codes, accelerator, args.batch_size, args.max_records)
    held_out = f"held-out bits/code: {result['heldout_bits_per_code']:.4f}"
    if result["trained_on_database"]:
        accelerator.print(f"{result['level']} prior on its code database {result['database']}: "
                          f"{result['heldout_records']} held-out and {result['train_records']} training records")
        accelerator.print(f"{held_out} (train {result['train_bits_per_code']:.4f}, "
                          f"gap {result['gap_bits_per_code']:+.4f})")
    else:
        accelerator.print(f"{result['level']} prior on {result['database']}, not the code database it trained on: "
                          f"all its {result['heldout_records']} records are held out")
        accelerator.print(f"{held_out} (another database: no train figure)")
    return f"{result['level']}_prior", result, accelerator


def vqvae(args):
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    model, extra = load_vqvae(args.ckpt)
    dataset = load_dataset(args.data, args.split, extra.get("image_size", 0))
    if args.max_images is not None:
        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    accelerator = stage_accelerator(args)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=args.batch_size))
    model = model.to(accelerator.device, memory_format=torch.channels_last)
    result = evaluate_vqvae(model, loader, accelerator, desc=args.split)
    for level in model.config.level_names:
        accelerator.print(f"{level} codes: {result[f'{level}_usage']:.1%} of {result[f'{level}_codes']} used, "
                          f"perplexity {result[f'{level}_perplexity']:.1f}")
    accelerator.print(f"{result['images']} {args.split} images")
    accelerator.print(f"{args.split} reconstruction mse: {result['mse']:.5f} (PSNR {result['psnr_db']:.2f} dB, "
                      f"SSIM {result['ssim']:.4f})")
    return "vqvae", result, accelerator


def samples(args):
    if min(args.per_class, args.classifier_steps) < 1:
        raise ValueError(f"--per-class and --classifier-steps must be >= 1, got {args.per_class} and {args.classifier_steps}")
    drawing = options_of(Drawing, args)
    pipeline_paths = chosen_model(args, instead=("--samples", "sample.py's samples"))
    # every refusal before the slow work: the weights file, the samples or checkpoints, the real data
    inception = sample_metrics.inception_fid_metric(args.inception_weights) if args.inception_weights else None
    machine = one_process(args)
    if pipeline_paths is None:
        drawn, pipeline = sample_metrics.load_samples(args.samples), None
        n_classes, size = int(drawn.labels.max()) + 1, drawn.images.shape[-1]
    else:
        pipeline = load_pipeline(*pipeline_paths).to(machine)
        n_classes, size = pipeline.n_classes, pipeline.image_size
    real = sample_metrics.real_images(args.data, size, n_classes, args.per_class, args.seed)
    if pipeline is not None:
        drawn = sample_metrics.draw_samples(pipeline, machine, args.per_class, args.seed, args.batch_size, drawing)
    result = sample_metrics.evaluate_samples(drawn, *real, n_classes, args.classifier_steps, args.seed,
                                             machine.device, inception)
    print(f"{len(drawn)} samples of {n_classes} classes against {result['real_heldout']} real held-out images")
    for metric, name in ((sample_metrics.LOCAL_FID, "local_fid"), (sample_metrics.LOCAL_KID, "local_kid")):
        print(f"{metric}: {result[f'{name}_samples']:.4f} (real training images: {result[f'{name}_real']:.4f})")
    if inception is None:
        print(f"Inception FID: not computed (give --inception-weights FILE: {sample_metrics.INCEPTION_SOURCE})")
    else:
        print(f"Inception FID: {result['inception_fid_samples']:.2f} (real training images: {result['inception_fid_real']:.2f})")
    print(f"CAS: {result['cas']:.4f} (real-data ceiling {result['cas_real_ceiling']:.4f})")
    return "samples", result, machine.processes


def one_process(args):
    return one_process_runtime(f"evaluate.py {args.stage}", args.device, args.precision)


def main():
    args = parse_args()
    check_result_file(args.json)
    start = time.perf_counter()
    stage, result, processes = {"pixels": pixels, "prior": prior, "vqvae": vqvae, "samples": samples}[args.stage](args)
    if args.json and processes.is_main_process:
        write_result(args.json, stage, {**result, "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    run(main)
