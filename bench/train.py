"""The `train` benchmark: training steps/s and model FLOP/s of every model the project trains,
each in fp32 and in the fast path (bf16 autocast, as the trainers run by default on this CPU;
optionally also under torch.compile), next to the machine's matmul peak measured in the same run.

Every model is timed as its trainer runs it, by construction: each timed step is the trainers' own
step function (`pipelines.train.loop.train_step`: the loss of the trainer's task on a batch as its loader
gives it, the finiteness checks, the clipped gradient, the Adam update), with the model's forward
wrapped in bf16 autocast as `accelerator.prepare` wraps it. Variants of one model are interleaved
round by round, so background load hits them alike.
"""

import functools
import itertools
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import convert_outputs_to_fp32
from torch.utils.flop_counter import FlopCounterMode

from bench.common import (CPU_ATTENTION_FLOPS, MATMUL_SHAPES, QUICK_MATMUL_SHAPES, VQVAE_QUICK_MODEL, Report,
                          add_common_arguments, apply_defaults, autocast, load_average, log, machine_info,
                          machine_lines, measure_matmul_peak, paired_speedups, time_interleaved)
from pipelines.data.codes import code_inputs
from pipelines.data.datasets import image_inputs
from pipelines.train.loop import train_step
from pipelines.train.pixelsnail import PixelSNAILTask, bits_loss
from pipelines.train.vqvae import VQVAETask, reconstruction_loss
from prior import PixelSNAIL, PixelSNAILConfig, get_preset
from vqvae import VQVAE2, VQVAE2Config

GRAD_CLIP = 1.0  # the trainers' default

# the reference: the most used public implementation's 11.45M top prior, seconds per step (bench/results/train.md)
REFERENCE_TOP_11M_SECONDS = 4.4


# -- the models -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    description: str
    batch_size: int
    build: Callable  # (batch) -> model in train mode, initialised
    make_batch: Callable  # (batch_size, generator) -> a batch as the trainer's loader gives it
    loss: Callable  # (model) -> the trainer's loss of one step, loss(forward, batch) -> pipelines.train.loop.Step
    betas: tuple


def pixelsnail_inputs(config):
    """The trainer's batch -> (x, label, cond) of this model: images, or top / bottom codes."""
    if config.pixel_mode:
        return image_inputs
    return code_inputs("top" if config.cond_codes is None else "bottom", labelled=False)


def pixelsnail_batch(config, batch_size, generator):
    """Random images (uint8, with labels), or random (top codes, bottom codes, labels)."""
    labels = torch.zeros(batch_size, dtype=torch.long)
    if config.pixel_mode:
        return torch.randint(0, 256, (batch_size, 3, *config.shape), generator=generator, dtype=torch.uint8), labels
    codes = torch.randint(0, config.n_codes, (batch_size, *config.shape), generator=generator)
    if config.cond_codes is None:
        return codes, None, labels
    return torch.randint(0, config.cond_codes, (batch_size, *config.cond_shape), generator=generator), codes, labels


def build_pixelsnail(config, batch):
    model = PixelSNAIL(config)
    model.init_from_data(*pixelsnail_inputs(config)(batch))
    return model.train()


def pixelsnail_case(description, config, batch_size):
    return Case(description, batch_size, functools.partial(build_pixelsnail, config),
                functools.partial(pixelsnail_batch, config),
                lambda model: functools.partial(bits_loss, model, pixelsnail_inputs(config)), PixelSNAILTask.betas)


def vqvae_batch(size, batch_size, generator):
    images = torch.randint(0, 256, (batch_size, 3, size, size), generator=generator, dtype=torch.uint8)
    return images, torch.zeros(batch_size, dtype=torch.long)


def build_vqvae(config, batch):
    return VQVAE2(config).to(memory_format=torch.channels_last).train()  # as VQVAETask.build


def vqvae_case(description, config, size, batch_size):
    return Case(description, batch_size, functools.partial(build_vqvae, config),
                functools.partial(vqvae_batch, size), lambda model: reconstruction_loss, VQVAETask.betas)


# the public implementation's 11.45M top prior, at equal size
TOP_11M = PixelSNAILConfig(
    shape=(32, 32), n_codes=512, channels=128, n_blocks=2, n_res_blocks=4, kernel_size=5, attention=True,
    n_heads=8, key_channels=64, value_channels=128, dropout=0.1, embed_channels=128,
)
CASES = {
    "top-11m": pixelsnail_case("top prior of the public implementation's size: 32x32 grid of 512 codes, 128 "
                               "channels, 2 blocks x 4 gated resnets, 5x5 convs, 8-head attention, dropout 0.1",
                               TOP_11M, 8),
    "cifar10": pixelsnail_case("the paper's CIFAR-10 model (cifar10 preset)", get_preset("cifar10").model, 8),
    "vqvae2-top-256ch": pixelsnail_case("vqvae2-top-256ch preset (32x32 codes)", get_preset("vqvae2-top-256ch").model,
                                        8),
    "vqvae2-bottom-256ch": pixelsnail_case("vqvae2-bottom-256ch preset (64x64 codes, two streams, conditioned on "
                                           "32x32 top codes)", get_preset("vqvae2-bottom-256ch").model, 2),
    # the paper's priors: over 600M parameters, one example per step on this machine's memory
    "vqvae2-top": pixelsnail_case("vqvae2-top preset, the paper's top prior (32x32 codes)",
                                  get_preset("vqvae2-top").model, 1),
    "vqvae2-bottom": pixelsnail_case("vqvae2-bottom preset, the paper's bottom prior (64x64 codes, two streams, "
                                     "conditioned on 32x32 top codes)", get_preset("vqvae2-bottom").model, 1),
    "vqvae-256": vqvae_case("the paper's VQ-VAE-2 at 256x256", VQVAE2Config(), 256, 8),
    # for --quick: seconds
    "tiny": pixelsnail_case("tiny preset", get_preset("tiny").model, 8),
    "vqvae-tiny": vqvae_case("a small VQ-VAE-2 at 32x32", VQVAE_QUICK_MODEL, 32, 4),
}
FULL_CASES = ["top-11m", "cifar10", "vqvae2-top-256ch", "vqvae2-bottom-256ch", "vqvae-256"]
QUICK_CASES = ["tiny", "vqvae-tiny"]

QUICK_DEFAULTS = dict(cases=",".join(QUICK_CASES), steps=2, warmup=1, matmul_repeats=2)
FULL_DEFAULTS = dict(cases=",".join(FULL_CASES), steps=4, warmup=1, matmul_repeats=4)


# -- FLOPs ------------------------------------------------------------------------------------


FLOP_COUNT_METHOD = (
    "torch.utils.flop_counter.FlopCounterMode over one forward + loss + backward at the benchmark's batch "
    "size. It counts convolutions (forward and backward) and matmuls; SDPA on CPU runs "
    "aten._scaled_dot_product_flash_attention_for_cpu, which the counter does not know, so torch's own SDPA "
    "formulas were registered for it (full N x N scores, as for the CUDA kernels; the causal CPU kernel skips "
    "roughly half of those blocks). Elementwise ops, the loss and the Adam update are not counted."
)


def count_step_flops(case, model, batch):
    """FLOPs of one forward + backward (the same in both precisions), in total and per aten op."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        with autocast("bf16"):
            loss = case.loss(model)(model, batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}
    return {"total": counter.get_total_flops(), "by_op": by_op}


# -- timing -----------------------------------------------------------------------------------


def variants(compile):
    """name -> (precision, compiled): fp32 and the fast path, and the fast path compiled if asked."""
    return {"fp32": ("fp32", False), "bf16": ("bf16", False), **({"bf16+compile": ("bf16", True)} if compile else {})}


def as_prepared(model, precision):
    """`model` run as `accelerator.prepare` runs it for `precision`: under bf16, its forward under
    autocast with outputs returned in fp32 (one process has one precision, so it is not prepared).
    A wrapper, so that the variants can share one model and its optimizer."""
    return Prepared(model) if precision == "bf16" else model


class Prepared(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return convert_outputs_to_fp32(autocast("bf16")(self.model))(*args, **kwargs)


def bench_case(case, batch_size, names, steps, warmup, seed, profile_fast_path=False):
    """Seconds per step of each variant of one model, the seconds of the first call of each (a
    compiled variant compiles in it) and the process's peak memory during it, and the step's
    counted FLOPs. The variants share one model and optimizer: a step takes the same time
    whatever the weights' values, and two copies of the paper's priors with their Adam state
    would not fit this machine's memory."""
    generator = torch.Generator().manual_seed(seed)
    batch = case.make_batch(batch_size, generator)
    torch.manual_seed(seed)
    model = case.build(batch)
    n_parameters = sum(p.numel() for p in model.parameters())
    flops = count_step_flops(case, model, batch)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=case.betas)
    runs, first_call, peak_rss = {}, {}, {}
    for name, (precision, compiled) in names.items():
        forward = as_prepared(torch.compile(model) if compiled else model, precision)
        runs[name] = functools.partial(train_step, accelerator, forward, optimizer, case.loss(model),
                                       itertools.repeat(batch), 0, GRAD_CLIP)
        with PeakRss() as rss:
            start = time.perf_counter()
            runs[name]()
            first_call[name] = time.perf_counter() - start
        peak_rss[name] = rss.peak_bytes
    seconds, other_cpu = time_interleaved(runs, steps, max(warmup - 1, 0), progress="train")
    profile = profile_step(runs["bf16"]) if profile_fast_path else None
    return seconds, other_cpu, first_call, peak_rss, flops, n_parameters, profile


class PeakRss:
    """The largest resident memory of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.peak_bytes = resident_bytes()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.done.wait(0.005):
            self.peak_bytes = max(self.peak_bytes, resident_bytes())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak_bytes = max(self.peak_bytes, resident_bytes())


def resident_bytes():
    """This process's resident memory (/proc/self/statm; 0 where there is none)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def profile_step(run, top=12):
    """The ops that took the most self CPU time in one call of `run` (a training step), with
    their share of the step: where the time goes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def summarise_case(case, batch_size, seconds, other_cpu, first_call, peak_rss, flops, n_parameters, profile, peaks):
    timings = {}
    for name, times in seconds.items():
        median_seconds = statistics.median(times)
        achieved = flops["total"] / median_seconds
        timings[name] = {
            "median_step_s": median_seconds,
            "min_step_s": min(times),
            "max_step_s": max(times),
            "steps_per_s": 1 / median_seconds,
            "images_per_s": batch_size / median_seconds,
            "first_step_s": first_call[name],
            "peak_rss_bytes": peak_rss[name],
            "step_seconds": times,
            "other_cpu_use": other_cpu[name],
            "achieved_flops_per_s": achieved,
            "fraction_of_bf16_peak": achieved / peaks["bf16"]["flops_per_s"],
            "fraction_of_fp32_peak": achieved / peaks["fp32"]["flops_per_s"],
        }
        if name != "fp32":
            timings[name]["speedup_vs_fp32"] = timings["fp32"]["median_step_s"] / median_seconds
            timings[name]["speedup_vs_fp32_paired_median"] = statistics.median(paired_speedups(seconds, "fp32", name))
    summary = {"description": case.description, "batch_size": batch_size, "parameters": n_parameters,
               "flops_per_step": flops, "train": timings}
    if profile is not None:
        summary["profile_bf16"] = profile
    return summary


def run(args):
    """Measures, in one run: the fp32 and bf16 matmul peak (best over several shapes), then for
    each model its training seconds per step in fp32 and in bf16 autocast (forward, loss,
    backward, Adam step; interleaved; median of the timed steps), its model FLOPs per step as
    FlopCounterMode counts them, the achieved FLOP/s and its fraction of the peak. Prints a
    table and writes train.json and train.md to --out."""
    apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    case_names = args.cases.split(",")
    unknown = [name for name in case_names if name not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}")
    info = machine_info()
    shapes = QUICK_MATMUL_SHAPES if args.quick else MATMUL_SHAPES
    log(f"matmul peak: best over {len(shapes)} shapes x {args.matmul_repeats} repeats")
    peaks = measure_matmul_peak(shapes, args.matmul_repeats)

    cases = {}
    for name in case_names:
        case = CASES[name]
        batch_size = args.batch_size or case.batch_size
        log(f"{name}: {case.description}, batch {batch_size}")
        measured = bench_case(case, batch_size, variants(args.compile), args.steps, args.warmup, args.seed,
                              args.profile)
        cases[name] = summarise_case(case, batch_size, *measured, peaks)
        if args.profile:
            log(f"{name}, one bf16 step, self CPU time: " + ", ".join(
                f"{row['op']} {row['share']:.0%}" for row in cases[name]["profile_bf16"]))
    results = {
        "benchmark": "train",
        **info,
        "load_average_after": load_average(),
        "config": {
            "cases": case_names,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "matmul_shapes": shapes,
            "matmul_repeats": args.matmul_repeats,
            "compile": args.compile,
            "bf16": "the forward wrapped as accelerate's prepare wraps it: bf16 autocast, outputs in fp32",
        },
        "matmul_peak": peaks,
        "flop_count_method": FLOP_COUNT_METHOD,
        "cases": cases,
    }
    if args.add:
        results = added_to(Path(args.out) / "train.json", results)
    REPORT.publish(results, args.out)


def added_to(path, results):
    """The results in `path` with this run's cases added (or replaced); each added case keeps
    the description of the run that measured it."""
    kept = json.loads(path.read_text())
    run = {key: results[key] for key in ("date", "command", "threads", "load_average_before", "load_average_after",
                                         "matmul_peak")}
    for name, case in results["cases"].items():
        kept["cases"][name] = {**case, "run": run}
    return kept


def add_arguments(parser):
    full, quick = FULL_DEFAULTS, QUICK_DEFAULTS
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run in seconds: {', '.join(f'{k}={v}' for k, v in quick.items())}")
    parser.add_argument("--cases", help=f"comma-separated models to train, of: {', '.join(CASES)} "
                        f"(default {full['cases']})")
    parser.add_argument("--batch-size", type=int, help="images per step for every case (default: each case's own)")
    parser.add_argument("--steps", type=int, help=f"timed steps per variant (default {full['steps']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps per variant first (default {full['warmup']})")
    parser.add_argument("--matmul-repeats", type=int,
                        help=f"timed matmuls per shape and precision (default {full['matmul_repeats']})")
    parser.add_argument("--compile", action="store_true",
                        help="also time the fast path under torch.compile (compiles for minutes per model)")
    parser.add_argument("--add", action="store_true",
                        help="add these cases to the train.json in --out (replacing cases of the same name) instead "
                        "of writing a new one; each added case keeps the date, load and matmul peak of its own run")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one bf16 step of each model (torch.profiler, top ops by self CPU "
                        "time, into the JSON): where the time goes")
    add_common_arguments(parser, "train", seed_help="seed of the weights and the batch")


# -- output -----------------------------------------------------------------------------------


def gflops(flops_per_s):
    return f"{flops_per_s / 1e9:.4g}"


HEADER = ("model", "variant", "s/step (median [min, max])", "images/s", "model GFLOP/step", "GFLOP/s",
          "of bf16 peak", "vs fp32", "first step s", "peak RSS, first step")


def train_rows(results):
    rows = []
    for case_name, case in results["cases"].items():
        for name, t in case["train"].items():
            rows.append((
                case_name, name,
                f"{t['median_step_s']:.3g} [{t['min_step_s']:.3g}, {t['max_step_s']:.3g}]",
                f"{t['images_per_s']:.3g}",
                f"{case['flops_per_step']['total'] / 1e9:.4g}",
                gflops(t["achieved_flops_per_s"]),
                f"{t['fraction_of_bf16_peak']:.1%}",
                f"{t['speedup_vs_fp32']:.2f}x (paired {t['speedup_vs_fp32_paired_median']:.2f}x)" if name != "fp32" else "",
                f"{t['first_step_s']:.3g}",
                f"{t['peak_rss_bytes'] / 2**30:.1f} GiB" if "peak_rss_bytes" in t else "",
            ))
    return rows


def target_lines(results):
    """The issue's targets, where the run measured the models they name."""
    cases = results["cases"]
    lines = []
    if "top-11m" in cases:
        seconds = cases["top-11m"]["train"]["bf16"]["median_step_s"]
        lines.append(f"target top-11m at or under 1.5 s/step (fast path): {seconds:.3g} s, "
                     f"{'met' if seconds <= 1.5 else 'missed'}; {REFERENCE_TOP_11M_SECONDS / seconds:.1f}x faster "
                     f"than the reference's {REFERENCE_TOP_11M_SECONDS} s on this machine (not rerun here)")
    for name in ("top-11m", "cifar10"):
        if name in cases:
            # the fraction of its own run's peak: an added case was measured in a run of its own
            best = max(t["fraction_of_bf16_peak"] for variant, t in cases[name]["train"].items() if variant != "fp32")
            lines.append(f"target {name} model FLOP/s at least 1/3 of the bf16 matmul peak: {best:.1%}, "
                         f"{'met' if best >= 1 / 3 else 'missed'}")
    return lines


def summary_lines(results):
    c, peaks = results["config"], results["matmul_peak"]
    return [
        *(f"{name}: {case['description']}, {case['parameters'] / 1e6:.2f}M parameters, batch {case['batch_size']}"
          for name, case in results["cases"].items()),
        f"matmul peak (best over {len(c['matmul_shapes'])} shapes): fp32 {gflops(peaks['fp32']['flops_per_s'])} "
        f"GFLOP/s at {peaks['fp32']['shape']}, bf16 {gflops(peaks['bf16']['flops_per_s'])} GFLOP/s at "
        f"{peaks['bf16']['shape']} (m, k, n)",
        *target_lines(results),
        *added_case_lines(results),
        f"{c['timed_steps']} timed steps per variant after {c['warmup_steps']} warm-up (the first step, timed "
        "apart, compiles a compiled variant), variants interleaved",
        *(["peak RSS: the process's largest resident memory during the variant's first step (model, Adam state, "
           "activations, and whatever the allocator kept from earlier steps: an upper bound)"]
          if any("peak_rss_bytes" in t for case in results["cases"].values() for t in case["train"].values()) else []),
        *machine_lines(results),
    ]


def added_case_lines(results):
    """One line per case added by a later run (--add): when, how, under what load."""
    lines = []
    for name, case in results["cases"].items():
        if "run" in case:
            run = case["run"]
            peak = gflops(run["matmul_peak"]["bf16"]["flops_per_s"])
            lines.append(f"{name}: added by `{run['command']}` on {run['date']}, {run['threads']} threads, load "
                         f"average before/after {run['load_average_before']} / {run['load_average_after']}; its "
                         f"FLOP/s fractions are of that run's bf16 matmul peak, {peak} GFLOP/s"
                         + (f"; {run['note']}" if "note" in run else ""))
    return lines


REPORT = Report("train", "Training benchmark", lambda results: (
    HEADER, train_rows(results), [*summary_lines(results), f"FLOP count: {results['flop_count_method']}"]))
