"""The `sample` benchmark: naive (one full forward per position) vs cached (prior.sampling, one new
position per step) sampling time for a top-prior-like code model, a bottom-prior-like conditioned
code model and the cpu-small pixel preset, interleaved in one run; the naive sampler is timed on a
prefix of positions and scaled to the whole grid."""

import statistics
from dataclasses import asdict

import torch

from bench.common import (SAMPLING_SCALING, DrawRecorder, Report, add_common_arguments, load_average, log, machine_info,
                          machine_lines, prefix_timing, random_inputs, seconds, time_interleaved)
from prior import PixelSNAIL, PixelSNAILConfig, get_preset
from prior.sampling import sample_cached, sample_naive

SAMPLERS = {"naive": sample_naive, "cached": sample_cached}
CACHED_BUDGET_S = 180


def sample_cases(quick):
    """name -> (what it stands for, config, batch size, naive positions timed, cached positions
    timed: None for the whole grid). --quick: tiny shapes, the numbers mean nothing."""
    if quick:
        tiny = dict(channels=16, n_blocks=1, n_res_blocks=1, key_channels=4, value_channels=8, dropout=0.0)
        return {
            "top": ("top-prior-like codes, class label (quick: tiny)",
                    PixelSNAILConfig(shape=(4, 4), n_codes=16, n_classes=3, embed_channels=8,
                                     cond_channels=8, kernel_size=3, **tiny), 4, 3, None),
            "bottom": ("bottom-prior-like codes, label + top codes (quick: tiny)",
                       PixelSNAILConfig(shape=(6, 6), n_codes=16, n_classes=3, cond_codes=16, cond_shape=(3, 3),
                                        embed_channels=8, cond_channels=8, cond_res_blocks=1, kernel_size=3,
                                        **{**tiny, "attention": False}), 4, 3, 12),
            "cpu-small": ("tiny pixel preset (quick)", get_preset("tiny").model, 4, 3, None),
        }
    return {
        "top": ("top-prior-like codes 32x32, class label",
                PixelSNAILConfig(shape=(32, 32), n_codes=512, n_classes=10, channels=128, n_blocks=2,
                                 n_res_blocks=4, kernel_size=5, attention=True, dropout=0.1), 16, 16, None),
        "bottom": ("bottom-prior-like codes 64x64, class label + random 32x32 top codes",
                   PixelSNAILConfig(shape=(64, 64), n_codes=512, n_classes=10, cond_codes=512, cond_shape=(32, 32),
                                    channels=128, n_blocks=2, n_res_blocks=4, kernel_size=5, attention=False,
                                    cond_channels=128, cond_res_blocks=4), 16, 6, None),
        "cpu-small": ("cpu-small pixel preset", get_preset("cpu-small").model, 16, 64, None),
    }


def compare_draws(naive, cached):
    """Identity of the draws both samplers made on the positions both recorded."""
    n = min(len(naive.draws), len(cached.draws))
    identical = all(torch.equal(a, b) for a, b in zip(naive.draws[:n], cached.draws[:n]))
    diff = max((float((a - b).abs().max()) for a, b in zip(naive.outputs[:n], cached.outputs[:n])), default=0.0)
    return {
        "positions_compared": n,
        "values_compared": sum(d.numel() for d in naive.draws[:n]),
        "identical_draws": identical,
        "max_abs_output_diff": diff,
    }


def make_sampling_model(config, batch_size, seed):
    """Random weights after the data-dependent init on random inputs, in eval mode; and the
    label and condition to sample with."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PixelSNAIL(config)
    x, label, cond = random_inputs(config, batch_size, generator)
    model.init_from_data(x, label, cond)
    model.eval()
    _, label, cond = random_inputs(config, batch_size, generator)  # fresh ones to sample with
    return model, label, cond


def bench_sampling_case(name, case, rounds, naive_positions, cached_positions, cached_budget_s, seed):
    title, config, batch_size, default_naive, default_cached = case
    n_positions = config.shape[0] * config.shape[1]
    positions = {
        "naive": min(naive_positions or default_naive, n_positions),
        "cached": min(cached_positions or default_cached or n_positions, n_positions),
    }
    model, label, cond = make_sampling_model(config, batch_size, seed)
    budgets = {"naive": None, "cached": cached_budget_s}
    check = min(positions.values())
    log(f"{name}: {title}, {model.num_parameters() / 1e6:.2f}M parameters, batch {batch_size}, "
        f"{n_positions} positions; naive timed on {positions['naive']}, cached on {positions['cached']} "
        f"(or {cached_budget_s:g} s)")
    recorders = {sampler: [] for sampler in SAMPLERS}

    def sample(sampler, limit, keep, budget_s=None):
        recorder = DrawRecorder(model, limit, keep, budget_s)
        recorders[sampler].append(recorder)
        recorder.run(SAMPLERS[sampler], batch_size, label, cond, torch.Generator().manual_seed(seed))

    for sampler in SAMPLERS:  # warm-up on 2 positions: thread pool, kernels, page faults
        sample(sampler, 2, 0)
        recorders[sampler].clear()
    runs = {  # the first run of each keeps its draws on the first `check` positions, to compare
        sampler: lambda sampler=sampler: sample(sampler, positions[sampler], 0 if recorders[sampler] else check,
                                                budgets[sampler])
        for sampler in SAMPLERS
    }
    _, other_cpu = time_interleaved(runs, rounds, 0, progress=name)
    timings = {
        sampler: [{**prefix_timing(recorder, n_positions), "other_cpu_use": other}
                  for recorder, other in zip(recorders[sampler], other_cpu[sampler])]
        for sampler in SAMPLERS
    }
    for sampler, sampler_timings in timings.items():
        log(f"  {name} {sampler}: " + "; ".join(
            f"{t['seconds_per_position'] * 1e3:.4g} ms/position, whole grid {'~' if t['scaled'] else ''}"
            f"{t['total_s']:.4g} s" for t in sampler_timings))
    return summarise_sampling_case(title, config, model, batch_size, label, cond, timings,
                                   compare_draws(recorders["naive"][0], recorders["cached"][0]))


def summarise_sampling_case(title, config, model, batch_size, label, cond, runs, check):
    summary = {}
    for sampler, sampler_runs in runs.items():
        summary[sampler] = {
            "timed_positions": min(r["timed_positions"] for r in sampler_runs),
            "scaled": any(r["scaled"] for r in sampler_runs),
            "seconds_per_position": statistics.median(r["seconds_per_position"] for r in sampler_runs),
            "total_s": statistics.median(r["total_s"] for r in sampler_runs),
            "other_cpu_use_median": statistics.median(r["other_cpu_use"] for r in sampler_runs),
            "runs": sampler_runs,
        }
    naive, cached = summary["naive"], summary["cached"]
    paired = [n["total_s"] / c["total_s"] for n, c in zip(naive["runs"], cached["runs"])]
    return {
        "title": title,
        "config": asdict(config),
        "parameters": model.num_parameters(),
        "batch_size": batch_size,
        "positions": config.shape[0] * config.shape[1],
        "label": label is not None,
        "cond_shape": None if cond is None else list(cond.shape),
        **summary,
        "speedup": naive["total_s"] / cached["total_s"],
        "speedup_paired_median": statistics.median(paired),
        "speedup_paired": paired,
        "per_position_speedup": naive["seconds_per_position"] / cached["seconds_per_position"],
        "check": check,
    }


def run(args):
    """Times, in one run, the naive sampler (prior.sampling.sample_naive: one full forward per
    position) against the cached one (sample_cached: one new position per step) for three models
    with random weights (data-dependent init on random inputs, eval mode), batch 16:
      top        top-prior-like code model, 32x32 codes, 512 codes, class label, attention
      bottom     bottom-prior-like code model, 64x64 codes, class label + a random 32x32 top-code
                 condition, no attention
      cpu-small  the cpu-small pixel preset (32x32 RGB)
    The naive sampler is far too slow to run whole: it is timed on a prefix of positions and
    scaled linearly to the grid (each naive step is a full forward whose cost does not depend on
    the position). The cached sampler runs the whole grid, unless a run takes longer than
    --cached-budget seconds: then it stops there and is scaled the same way. Naive and cached
    runs alternate (round 1 naive first, round 2 cached first, ...), other processes' CPU use is
    recorded for each, and the medians over the rounds are reported. With the same seed both
    samplers draw the same values: checked on the positions both timed. Prints a table and
    writes sample.json and sample.md to --out.

    --pipeline instead: 16 hierarchical samples at the paper's size (vqvae2-top 32x32, then
    vqvae2-bottom 64x64 given random top codes, then the paper's VQ-VAE decoding to 256x256),
    random weights, fp32 and bf16 autocast: the cached sampler's time per position of each level
    (timed on a row and one position, scaled to the grid), the wall time of 16 samples, the model
    FLOP/s of the cached step against the bf16 matmul peak and the weight bytes per position against
    the memory bandwidth, both measured in the same run (bench/sample_pipeline.py). Writes
    sample-pipeline.json and .md. --hierarchy ffhq1024: the same for 4 samples of the FFHQ-1024
    model (three priors, decoded to 1024x1024), in sample-pipeline-ffhq1024.json and .md."""
    if args.quick and args.threads is None:
        args.threads = 1  # tiny models: two threads mostly wait on each other when other jobs hold the cores
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    info = machine_info()
    if args.hierarchy != "imagenet256":
        raise ValueError("--hierarchy chooses the model of --pipeline: give --pipeline too")
    cases = sample_cases(args.quick)
    if unknown := sorted(set(args.models or ()) - set(cases)):
        raise ValueError(f"--models {' '.join(unknown)}: a level of --pipeline; this benchmark's models are "
                         f"{', '.join(cases)}")
    if args.models:
        cases = {name: cases[name] for name in args.models}
    results = {
        "benchmark": "sample",
        **info,
        "quick": args.quick,
        "rounds": rounds,
        "seed": args.seed,
        "scaling": SAMPLING_SCALING,
        "cached_budget_s": args.cached_budget,
        "models": {
            name: bench_sampling_case(name, case, rounds, args.naive_positions, args.cached_positions,
                                      args.cached_budget, args.seed)
            for name, case in cases.items()
        },
        "load_average_after": load_average(),
    }
    REPORT.publish(results, args.out)


def add_arguments(parser):
    parser.add_argument("--pipeline", action="store_true",
                        help="16 hierarchical samples at the paper's size (vqvae2-top, vqvae2-bottom, the VQ-VAE), "
                             "fp32 and bf16, against the bf16 matmul peak; writes sample-pipeline.json/.md")
    parser.add_argument("--hierarchy", choices=["imagenet256", "ffhq1024"], default="imagenet256",
                        help="--pipeline: the paper's model benchmarked: ImageNet 256 (two levels) or FFHQ 1024 (three "
                             "levels, vqvae2-ffhq-*; writes sample-pipeline-ffhq1024.json/.md)")
    parser.add_argument("--n-samples", type=int, default=None,
                        help="--pipeline: samples, the batch (default 16; --hierarchy ffhq1024: 4)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="--pipeline: the precisions to time (default both)")
    parser.add_argument("--quick", action="store_true", help="smoke run in seconds with tiny models, 1 round, 1 thread")
    parser.add_argument("--models", nargs="+", choices=[*sample_cases(False), "middle"],
                        help="which models (default all; --pipeline: the levels, top, [middle,] bottom)")
    parser.add_argument("--rounds", type=int,
                        help="timed runs per sampler and model, interleaved (default 3; --pipeline: 1)")
    parser.add_argument("--naive-positions", type=int,
                        help="positions the naive sampler is timed on (default top 16, bottom 6, cpu-small 64)")
    parser.add_argument("--cached-positions", type=int,
                        help="positions the cached sampler is timed on (default the whole grid; --pipeline: one "
                             "row and one position)")
    parser.add_argument("--cached-budget", type=float, default=CACHED_BUDGET_S,
                        help=f"seconds after which a cached run stops and is scaled (default {CACHED_BUDGET_S})")
    add_common_arguments(parser, "sample", seed_help="seed of the weights, the inputs and the draws")


# -- output -----------------------------------------------------------------------------------


def sample_target(name, models):
    """The issue's target for a model's speed-up and whether this run met it (None: no target)."""
    speedup = models[name]["speedup"]
    if name == "top":
        verdict = "goal met" if speedup >= 100 else "target met, goal not" if speedup >= 50 else "NOT met"
        return f"target >= 50x, goal 100x: {verdict}"
    if name == "bottom" and "top" in models:
        top = models["top"]["speedup"]
        return f"target more than top's {top:.0f}x: {'met' if speedup > top else 'NOT met'}"
    return None


def sample_rows(results):
    """(model, positions x batch, naive per position, naive total, cached per position, cached
    total, speed-up, other CPU, draws) rows shared by the terminal table and the markdown."""
    rows = []
    for name, r in results["models"].items():
        naive, cached = r["naive"], r["cached"]

        def total(s):
            how = f"scaled from {s['timed_positions']}" if s["scaled"] else "measured"
            return f"{'~' if s['scaled'] else ''}{seconds(s['total_s'])} ({how})"

        check = r["check"]
        rows.append((
            f"{name} ({r['parameters'] / 1e6:.2f}M)",
            f"{r['positions']} x {r['batch_size']}",
            seconds(naive["seconds_per_position"]),
            total(naive),
            seconds(cached["seconds_per_position"]),
            total(cached),
            f"{r['speedup']:.0f}x" if r["speedup"] >= 10 else f"{r['speedup']:.2g}x",
            f"{naive['other_cpu_use_median']:.0%} / {cached['other_cpu_use_median']:.0%}",
            f"{'identical' if check['identical_draws'] else 'DIFFER'} ({check['positions_compared']} positions)",
        ))
    return rows


SAMPLE_HEADER = ("model (params)", "positions x batch", "naive s/position", "naive whole grid",
                 "cached s/position", "cached whole grid", "speed-up", "other CPU naive/cached", "draws")


def sample_summary_lines(results):
    lines = []
    for name, r in results["models"].items():
        target = sample_target(name, results["models"])
        lines.append(
            f"{name}: {r['title']}; speed-up {r['speedup']:.1f}x (whole grid, median times of {results['rounds']} "
            f"rounds; per-round paired median {r['speedup_paired_median']:.1f}x, per position "
            f"{r['per_position_speedup']:.1f}x){'; ' + target if target else ''}; draws on the first "
            f"{r['check']['positions_compared']} positions ({r['check']['values_compared']} values) "
            f"{'identical' if r['check']['identical_draws'] else 'DIFFER'}, max |output difference| "
            f"{r['check']['max_abs_output_diff']:.2g}"
        )
    for name, r in results["models"].items():
        rounds = "; ".join(
            f"{n['total_s']:.4g} s / {c['total_s']:.4g} s = {n['total_s'] / c['total_s']:.1f}x "
            f"(other CPU {n['other_cpu_use']:.0%} / {c['other_cpu_use']:.0%})"
            for n, c in zip(r["naive"]["runs"], r["cached"]["runs"])
        )
        lines.append(f"{name} per round, naive / cached whole grid: {rounds}")
    lines += [
        f"scaling: {results['scaling']}",
        *machine_lines(results),
    ]
    return lines


REPORT = Report("sample", "Sampling benchmark: naive vs cached",
                lambda results: (SAMPLE_HEADER, sample_rows(results), sample_summary_lines(results)),
                quick="tiny models")
