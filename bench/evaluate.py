"""The `eval` benchmark: every stage of a pipeline run evaluated through scripts/evaluate.py itself,
one stage after the other: the numbers (with the real-data ceilings beside the samples' figures) and
how long each evaluation took."""

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (OtherCpuUse, Report, add_out_argument, add_quick_argument, apply_defaults, load_average, log,
                          machine_info, machine_lines, recorded_path, run_command)

QUICK_DEFAULTS = dict(per_class=4, classifier_steps=10)
FULL_DEFAULTS = dict(per_class=100, classifier_steps=300)
STAGES = ("vqvae", "top_prior", "bottom_prior", "samples")


def add_arguments(parser):
    parser.add_argument("--run-dir", default="runs/demo",
                        help="a pipeline run as scripts/demo.py writes it: vqvae/, codes.lmdb, top/, bottom/")
    parser.add_argument("--data", default="builtin", help="the real data the pipeline was trained on")
    parser.add_argument("--per-class", type=int, help=f"samples per class (default {FULL_DEFAULTS['per_class']})")
    parser.add_argument("--classifier-steps", type=int,
                        help=f"steps of each small classifier (default {FULL_DEFAULTS['classifier_steps']})")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="evaluate.py's --device")
    add_quick_argument(parser, QUICK_DEFAULTS)
    add_out_argument(parser, "eval.json and eval.md")


def stage_arguments(args):
    """evaluate.py's arguments for each stage."""
    run = Path(args.run_dir)
    pipeline = ["--vqvae", run / "vqvae", "--top", run / "top", "--bottom", run / "bottom"]
    arguments = {
        "vqvae": ["vqvae", "--ckpt", run / "vqvae", "--data", args.data],
        "top_prior": ["prior", "--ckpt", run / "top", "--codes", run / "codes.lmdb"],
        "bottom_prior": ["prior", "--ckpt", run / "bottom", "--codes", run / "codes.lmdb"],
        "samples": ["samples", *pipeline, "--data", args.data, "--per-class", args.per_class,
                    "--classifier-steps", args.classifier_steps],
    }
    device = ["--device", args.device] if args.device else []
    return {stage: [str(value) for value in [*words, *device]] for stage, words in arguments.items()}


def evaluate_stages(args, report):
    """Runs evaluate.py for every stage with --json report -> (its printed lines, seconds, other CPU use) per stage."""
    printed, seconds, other_cpu = {}, {}, {}
    for stage, arguments in stage_arguments(args).items():
        command = [sys.executable, "scripts/evaluate.py", *arguments, "--json", str(report)]
        log(f"{stage}: {shlex.join(command[1:])}")
        with OtherCpuUse(include_children=True) as contention:
            start = time.perf_counter()
            result = run_command(command, check=False)
            seconds[stage] = time.perf_counter() - start
        if result.returncode:
            raise SystemExit(f"evaluate.py {arguments[0]} failed: {result.stderr.strip()[-2000:]}")
        printed[stage] = result.stdout.strip().splitlines()
        other_cpu[stage] = contention.fraction
        log(f"  {printed[stage][-1]} ({seconds[stage]:.0f} s, other CPU {contention.fraction:.0%})")
    return printed, seconds, other_cpu


def run(args):
    """Evaluates a pipeline run's VQ-VAE, top and bottom priors and class-conditional samples through
    scripts/evaluate.py (one process each, one after the other) and writes eval.json / eval.md: every
    number each stage files with --json, its printed result lines and its wall time (start-up
    included). --quick: a smoke run of few samples and classifier steps."""
    apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    results = machine_info()
    results["config"] = {"run_dir": recorded_path(args.run_dir), "data": recorded_path(args.data),
                         "per_class": args.per_class, "classifier_steps": args.classifier_steps, "device": args.device}
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "eval.json"
        printed, seconds, other_cpu = evaluate_stages(args, report)
        results["stages"] = json.loads(report.read_text())
    results.update(printed=printed, seconds=seconds, other_cpu_use=other_cpu, load_average_after=load_average())
    REPORT.publish(results, args.out)


def table(results):
    stages, seconds = results["stages"], results["seconds"]
    vqvae, samples = stages["vqvae"], stages["samples"]
    rows = [["VQ-VAE (test split)", "reconstruction MSE / PSNR / SSIM",
             f"{vqvae['mse']:.5f} / {vqvae['psnr_db']:.2f} dB / {vqvae['ssim']:.4f}", "", seconds["vqvae"]]]
    for level in ("top", "bottom"):
        rows.append(["VQ-VAE", f"{level} codes used / perplexity (of {vqvae[f'{level}_codes']})",
                     f"{vqvae[f'{level}_usage']:.1%} / {vqvae[f'{level}_perplexity']:.1f}", "", None])
    for level in ("top", "bottom"):
        prior = stages[f"{level}_prior"]
        rows.append([f"{level} prior", "bits/code held-out (train, gap)",
                     f"{prior['heldout_bits_per_code']:.4f} ({prior['train_bits_per_code']:.4f}, "
                     f"{prior['gap_bits_per_code']:+.4f})", "", seconds[f"{level}_prior"]])
    rows += [
        ["samples", "CAS (classifier trained on samples, tested on real)", f"{samples['cas']:.4f}",
         f"{samples['cas_real_ceiling']:.4f} (trained on real)", seconds["samples"]],
        ["samples", "local FID (classifier features)", f"{samples['local_fid_samples']:.4f}",
         f"{samples['local_fid_real']:.4f} (real training images)", None],
        ["samples", "local KID (classifier features)",
         f"{samples['local_kid_samples']:.4f} ± {samples['local_kid_std_samples']:.4f}",
         f"{samples['local_kid_real']:.4f} ± {samples['local_kid_std_real']:.4f}", None],
    ]
    rows = [[*row[:4], "" if row[4] is None else f"{row[4]:.0f} s"] for row in rows]
    config = results["config"]
    notes = [
        *machine_lines(results),
        f"run {config['run_dir']}, data {config['data']}; samples: {config['per_class']} per class x "
        f"{samples['classes']} classes against {samples['real_heldout']} real held-out images; "
        f"classifiers: {config['classifier_steps']} steps each",
        "seconds: each evaluate.py process from start to exit (imports and model loading included); the "
        "samples' time includes drawing the samples and training two classifiers",
        "other processes' CPU use during each stage: " + ", ".join(
            f"{stage} {fraction:.0%}" for stage, fraction in results["other_cpu_use"].items()),
        "local FID / KID: in the feature space of a classifier trained here on the real data: comparable "
        "between pipelines on the same data only, never with a published (Inception) FID",
        "local KID's ± is the spread over 100 subsets of min(1000, N) images each: with N <= 1000 every subset "
        "holds every image, so it is 0 (not a measure of the uncertainty)",
    ]
    header = ["stage", "figure", "value", "real data (the ceiling)", "seconds"]
    return header, rows, notes


REPORT = Report("eval", "Evaluation of every stage", table)
