"""The `vqvae` benchmark: VQ-VAE-2 (the paper's model) training and code-extraction images/s at
256x256, fp32 vs bf16 autocast vs bf16 autocast + channels_last, interleaved in one run."""

import copy
import functools
import statistics
from dataclasses import asdict

import torch

from bench.common import (VQVAE_QUICK_MODEL, Report, add_common_arguments, apply_defaults, autocast, channels_last,
                          load_average, log, machine_info, machine_lines, paired_speedups, random_pixels, seconds,
                          time_interleaved, vqvae_extract)
from vqvae import VQVAE2, VQVAE2Config

# variant -> (precision, channels_last): bf16 is bf16 autocast, the quantizer staying fp32 inside
VQVAE_VARIANTS = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "bf16_channels_last": ("bf16", True),
    "fp32_channels_last": ("fp32", True),
}
VQVAE_DEFAULT_VARIANTS = ["fp32", "bf16", "bf16_channels_last"]
VQVAE_LR = 3e-4  # Adam with torch's default betas, as pipelines/train/vqvae.py
# --quick runs one thread: on a tiny model two threads mostly wait on each other, seconds per step
# when other jobs hold the cores
VQVAE_QUICK_DEFAULTS = dict(size=32, batch_size=4, steps=2, warmup=1, extract_batch_size=8, extract_batches=2, threads=1)
VQVAE_FULL_DEFAULTS = dict(size=256, batch_size=8, steps=10, warmup=2, extract_batch_size=32, extract_batches=6,
                           threads=None)


def to_memory_format(variant, model, x):
    """The model and the input in the variant's memory format (channels_last or as they are)."""
    return channels_last(model, x) if VQVAE_VARIANTS[variant][1] else (model, x)


def vqvae_train_step(model, optimizer, x, precision):
    """As pipelines/train/vqvae.py runs a step (without its gradient clipping): the forward,
    with its fp32 losses, under autocast; backward, Adam step and zero_grad outside it."""
    with autocast(precision):
        loss = model(x).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


QUIET = 0.10  # a round is quiet when other processes took less than this share of the CPU during every call


def summarise_variants(seconds, other_cpu, images, variants):
    """Per variant: images/s from the median time of a call of `images` images, and its spread;
    speed-ups against fp32 and bf16 (ratio of medians and the per-round paired median); and the
    same over the quiet rounds only (other processes' CPU use < QUIET during every call of the
    round; None when no round was quiet): two threads stall badly when another job takes a core."""
    n_rounds = len(seconds[variants[0]])
    quiet = [i for i in range(n_rounds) if all(other_cpu[name][i] < QUIET for name in variants)]
    summary = {}
    for name in variants:
        median_seconds = statistics.median(seconds[name])
        summary[name] = {
            "images_per_s": images / median_seconds,
            "median_s": median_seconds,
            "min_s": min(seconds[name]),
            "max_s": max(seconds[name]),
            "seconds": seconds[name],
            "other_cpu_use": other_cpu[name],
            "other_cpu_use_median": statistics.median(other_cpu[name]),
            "quiet_rounds": quiet,
            "images_per_s_quiet": images / statistics.median(seconds[name][i] for i in quiet) if quiet else None,
        }
    for name in variants:
        for base in ("fp32", "bf16"):
            if base in variants and base != name:
                paired = paired_speedups(seconds, base, name)
                summary[name][f"speedup_vs_{base}"] = summary[base]["median_s"] / summary[name]["median_s"]
                summary[name][f"speedup_vs_{base}_paired_median"] = statistics.median(paired)
                summary[name][f"speedup_vs_{base}_quiet_paired_median"] = (
                    statistics.median(paired[i] for i in quiet) if quiet else None)
    return summary


def bench_vqvae_training(config, variants, x, steps, warmup, seed):
    """Training seconds per step of each variant, one model and Adam optimizer each, the same
    initial weights. Returns the summary and the fp32 model (or the first variant's)."""
    torch.manual_seed(seed)
    base = VQVAE2(config).train()
    models, optimizers, inputs = {}, {}, {}
    for name in variants:
        models[name], inputs[name] = to_memory_format(name, copy.deepcopy(base), x)
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=VQVAE_LR)
    runs = {name: functools.partial(vqvae_train_step, models[name], optimizers[name], inputs[name],
                                    VQVAE_VARIANTS[name][0]) for name in variants}
    seconds, other_cpu = time_interleaved(runs, steps, warmup, progress="train")
    trained = models["fp32" if "fp32" in variants else variants[0]]
    return summarise_variants(seconds, other_cpu, len(x), variants), trained


def code_agreement(codes, reference):
    """Fraction of positions where a variant chose the same top and bottom codes as the reference."""
    return {level: float((a == b).float().mean()) for level, a, b in zip(("top", "bottom"), codes, reference)}


def bench_vqvae_extraction(trained, variants, x, batches, warmup):
    """Code-extraction seconds per batch of each variant, all from copies of the same weights
    (the trained model's, its codebooks initialised from encoder outputs by its first steps),
    and how often each variant's codes equal fp32's on that batch."""
    base = copy.deepcopy(trained).to(memory_format=torch.contiguous_format).eval()
    models, inputs, codes = {}, {}, {}
    for name in variants:
        models[name], inputs[name] = to_memory_format(name, copy.deepcopy(base), x)

    def extract(name):
        codes[name] = vqvae_extract(models[name], inputs[name], VQVAE_VARIANTS[name][0])

    runs = {name: functools.partial(extract, name) for name in variants}
    seconds, other_cpu = time_interleaved(runs, batches, warmup, progress="extract")
    summary = summarise_variants(seconds, other_cpu, len(x), variants)
    reference = codes["fp32"] if "fp32" in codes else vqvae_extract(base, x, "fp32")
    for name in variants:
        summary[name]["codes_equal_to_fp32"] = code_agreement(codes[name], reference)
    return summary


def run_config(args, config, variants, n_parameters):
    """What the run measured, as its JSON records it."""
    return {
        "model": asdict(config),
        "paper_model": config == VQVAE2Config(),
        "parameters": n_parameters,
        "image_size": args.size,
        "variants": {name: {"precision": VQVAE_VARIANTS[name][0], "channels_last": VQVAE_VARIANTS[name][1]}
                     for name in variants},
        "train_batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "extract_batch_size": args.extract_batch_size,
        "extract_warmup_batches": args.extract_warmup,
        "extract_timed_batches": args.extract_batches,
        "optimizer": f"Adam lr={VQVAE_LR}, torch's default betas (no gradient clipping)",
        "bf16": "torch.autocast('cpu', dtype=torch.bfloat16) around the forward (or encode); "
                "the quantizer and the losses in fp32",
        "channels_last": "model.to(memory_format=torch.channels_last) and the input "
                         ".contiguous(memory_format=torch.channels_last)",
        "seed": args.seed,
    }


def run(args):
    """Measures, in one run, VQ-VAE-2 images/s for several variants: fp32, bf16 autocast, and bf16
    autocast with the model and the input in channels_last memory format (fp32_channels_last on
    request). Random weights, random images on the 256-value grid of [-1, 1].
      training    the paper's model (VQVAE2Config()), 256x256, batch 8: forward (its fp32 losses
                  inside), loss.backward, Adam step, zero_grad; 2 warm-up steps per variant, then
                  timed steps, interleaved; median
      extraction  model.eval(), no gradients, model.encode(images) on batches of 32, the same
                  weights for every variant (the fp32 model after its training steps); 1 warm-up
                  batch, then timed batches, interleaved; median; and the fraction of codes each
                  variant chooses equal to fp32's (untrained model, noise images: indicative only)
    Ratios are against fp32: of the medians, and the median of the per-round ratios. Other
    processes' CPU use is recorded for every timed call. Prints a table and writes vqvae.json and
    vqvae.md to --out. --quick: 32x32 images and a tiny model, seconds; the numbers mean nothing."""
    apply_defaults(args, VQVAE_QUICK_DEFAULTS if args.quick else VQVAE_FULL_DEFAULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = list(dict.fromkeys(args.variants or VQVAE_DEFAULT_VARIANTS))
    config = VQVAE_QUICK_MODEL if args.quick else VQVAE2Config()
    info = machine_info()
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.size, args.size)
    n_parameters = VQVAE2(config).num_parameters()

    log(f"VQ-VAE-2 training, {n_parameters / 1e6:.2f}M parameters, {args.size}x{args.size}, batch {args.batch_size}: "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant ({', '.join(variants)}), interleaved")
    train, trained = bench_vqvae_training(config, variants, random_pixels(args.batch_size, shape, generator),
                                          args.steps, args.warmup, args.seed)
    log(f"code extraction, batch {args.extract_batch_size}: {args.extract_warmup} warm-up + "
        f"{args.extract_batches} timed batches per variant, interleaved")
    extract = bench_vqvae_extraction(trained, variants, random_pixels(args.extract_batch_size, shape, generator),
                                     args.extract_batches, args.extract_warmup)
    results = {
        "benchmark": "vqvae",
        **info,
        "load_average_after": load_average(),
        "quick": args.quick,
        "config": run_config(args, config, variants, n_parameters),
        "train": train,
        "extract": extract,
    }
    REPORT.publish(results, args.out)


def add_arguments(parser):
    full, quick = VQVAE_FULL_DEFAULTS, VQVAE_QUICK_DEFAULTS
    parser.add_argument("--quick", action="store_true", help="smoke run in seconds with a tiny model: "
                        + ", ".join(f"{k}={v}" for k, v in quick.items()))
    parser.add_argument("--variants", nargs="+", choices=list(VQVAE_VARIANTS),
                        help=f"what to compare (default {' '.join(VQVAE_DEFAULT_VARIANTS)})")
    parser.add_argument("--size", type=int, help=f"image side, a multiple of 8 (default {full['size']})")
    parser.add_argument("--batch-size", type=int, help=f"training images per step (default {full['batch_size']})")
    parser.add_argument("--steps", type=int, help=f"timed training steps per variant (default {full['steps']})")
    parser.add_argument("--warmup", type=int,
                        help=f"untimed training steps per variant first (default {full['warmup']})")
    parser.add_argument("--extract-batch-size", type=int,
                        help=f"images per extraction batch (default {full['extract_batch_size']})")
    parser.add_argument("--extract-batches", type=int,
                        help=f"timed extraction batches per variant (default {full['extract_batches']})")
    parser.add_argument("--extract-warmup", type=int, default=1, help="untimed extraction batches per variant first")
    add_common_arguments(parser, "vqvae", seed_help="seed of the weights and the images")


# -- output -----------------------------------------------------------------------------------


def ratio(value):
    return f"{value:.2f}x"


def vqvae_rows(results):
    """(label, one text per variant) rows shared by the terminal table and the markdown."""
    variants = list(results["config"]["variants"])
    train, extract = results["train"], results["extract"]

    def each(format_one):
        return tuple(format_one(name) for name in variants)

    def speedup(phase, base):
        def text(name):
            precision, channels_last = VQVAE_VARIANTS[name]
            if f"speedup_vs_{base}" not in phase[name] or (base != "fp32" and (precision, channels_last) != (base, True)):
                return "-"
            return (f"{ratio(phase[name][f'speedup_vs_{base}'])} "
                    f"(paired {ratio(phase[name][f'speedup_vs_{base}_paired_median'])})")
        return text

    def quiet_speedup(phase, base):
        def text(name):
            precision, channels_last = VQVAE_VARIANTS[name]
            value = phase[name].get(f"speedup_vs_{base}_quiet_paired_median")
            if value is None or (base != "fp32" and (precision, channels_last) != (base, True)):
                return "-"
            return ratio(value)
        return text

    def spread(phase, unit):
        return lambda name: (f"{seconds(phase[name]['median_s'])} [{seconds(phase[name]['min_s'])}, "
                             f"{seconds(phase[name]['max_s'])}]")

    rows = []
    for label, phase, unit in (("training", train, "step"), ("extraction", extract, "batch")):
        rows += [
            (f"{label} images/s (median)", *each(lambda n, p=phase: f"{p[n]['images_per_s']:.3g}")),
            (f"{label} s/{unit} (median [min, max])", *each(spread(phase, unit))),
            (f"{label} speed-up vs fp32", *each(speedup(phase, "fp32"))),
        ]
        with_bf16_channels_last = "bf16" in variants and "bf16_channels_last" in variants
        if with_bf16_channels_last:
            rows.append((f"{label} speed-up vs bf16", *each(speedup(phase, "bf16"))))
        rows.append((f"{label}: other processes' CPU (median)",
                     *each(lambda n, p=phase: f"{p[n]['other_cpu_use_median']:.0%}")))
        quiet, n_rounds = phase[variants[0]]["quiet_rounds"], len(phase[variants[0]]["seconds"])
        if quiet and len(quiet) < n_rounds:
            where = f"quiet rounds only ({len(quiet)} of {n_rounds})"
            rows += [
                (f"{label} images/s, {where}", *each(lambda n, p=phase: f"{p[n]['images_per_s_quiet']:.3g}")),
                (f"{label} speed-up vs fp32, {where}, paired", *each(quiet_speedup(phase, "fp32"))),
            ]
            if with_bf16_channels_last:
                rows.append((f"{label} speed-up vs bf16, {where}, paired", *each(quiet_speedup(phase, "bf16"))))
    rows.append(("extraction codes equal to fp32's (top / bottom)",
                 *each(lambda n: "{top:.1%} / {bottom:.1%}".format(**extract[n]["codes_equal_to_fp32"]))))
    return [("", *variants), *rows]


def channels_last_verdict(phase, name, base):
    """Whether channels_last helped in one phase: from the paired median against the same
    precision without it, over the quiet rounds when at least two were quiet."""
    timing = phase[name]
    quiet, n_rounds = timing["quiet_rounds"], len(timing["seconds"])
    if len(quiet) >= 2:
        paired, source = timing[f"speedup_vs_{base}_quiet_paired_median"], f"quiet rounds ({len(quiet)} of {n_rounds}), paired"
    else:
        paired, source = timing[f"speedup_vs_{base}_paired_median"], f"all {n_rounds} rounds, paired"
    verdict = "helps" if paired > 1.05 else "hurts" if paired < 0.95 else "makes no clear difference"
    return (f"{verdict}: {ratio(paired)} {base}'s speed ({source}; ratio of all medians "
            f"{ratio(timing[f'speedup_vs_{base}'])})")


def vqvae_summary_lines(results):
    c = results["config"]
    model = "the paper's model (VQVAE2Config())" if c["paper_model"] else "a tiny model (--quick)"
    lines = [
        f"{model}, {c['parameters'] / 1e6:.2f}M parameters, {c['image_size']}x{c['image_size']} random images; "
        f"training batch {c['train_batch_size']}, {c['timed_steps']} timed steps per variant after "
        f"{c['warmup_steps']} warm-up; extraction batch {c['extract_batch_size']}, {c['extract_timed_batches']} "
        f"timed batches after {c['extract_warmup_batches']} warm-up; variants interleaved, order alternating",
        f"training step: forward (losses in fp32), loss.backward, {c['optimizer']}, zero_grad; "
        f"extraction: eval mode, no_grad, model.encode",
        f"bf16: {c['bf16']}; channels_last: {c['channels_last']}",
        "speed-ups: ratio of the median times (paired: median of the per-round ratios, least exposed to load drift)",
    ]
    for name in c["variants"]:
        if name in ("fp32", "bf16"):
            continue
        lines.append(f"{name} vs fp32: " + ", ".join(
            f"{label} {ratio(results[phase][name]['speedup_vs_fp32'])} (paired "
            f"{ratio(results[phase][name]['speedup_vs_fp32_paired_median'])}"
            + (f"; quiet rounds paired {ratio(quiet)})" if (quiet := results[phase][name]["speedup_vs_fp32_quiet_paired_median"])
               is not None and len(results[phase][name]["quiet_rounds"]) < len(results[phase][name]["seconds"]) else ")")
            for phase, label in (("train", "training"), ("extract", "extraction"))))
        base, channels_last = VQVAE_VARIANTS[name]
        if channels_last and base in c["variants"]:
            lines.append(f"channels_last with {base}: training {channels_last_verdict(results['train'], name, base)}; "
                         f"extraction {channels_last_verdict(results['extract'], name, base)}")
    busy = max(results[phase][name]["other_cpu_use_median"] for phase in ("train", "extract") for name in c["variants"])
    if busy >= QUIET:
        lines.append(f"other processes took up to {busy:.0%} of the CPU (median of a variant's calls): two threads "
                     f"stall badly when a core is taken, so the quiet rounds (every call of the round < "
                     f"{QUIET:.0%} other CPU) are the figures to trust")
    lines += [
        "codes equal to fp32's: on one extraction batch, same weights; the model is untrained and the images "
        "are noise, so this only shows that lower precision can flip near-tied nearest codes",
        *machine_lines(results),
    ]
    return lines


def vqvae_table(results):
    header, *rows = vqvae_rows(results)
    return header, rows, vqvae_summary_lines(results)


REPORT = Report("vqvae", "VQ-VAE-2 benchmark: training and code extraction, fp32 vs bf16 autocast vs channels_last",
                vqvae_table,
                quick="32x32 images and a tiny model")
