"""Benchmarks of this code on this machine, with the numbers written to JSON and markdown.

Subcommands:
  train   matmul peak (fp32, bf16) and PixelSNAIL training steps/s in fp32 and in bf16 autocast,
          measured in one run (interleaved, so background load hits both alike), plus the
          model's counted FLOPs per step, the achieved FLOP/s and its fraction of the peak.
  sample  naive (one full forward per position) vs cached (prior.sampling, one new position per
          step) sampling time for a top-prior-like code model, a bottom-prior-like conditioned
          code model and the cpu-small pixel preset, interleaved in one run; the naive sampler is
          timed on a prefix of positions and scaled to the whole grid.
  vqvae   VQ-VAE-2 (the paper's model) training and code-extraction images/s at 256x256, fp32
          vs bf16 autocast vs bf16 autocast + channels_last, interleaved in one run.

Examples:
  python scripts/bench.py train                 # the cifar10 preset, a few minutes
  python scripts/bench.py train --quick         # smoke run with the tiny preset, seconds
  python scripts/bench.py train --steps 10 --out /tmp/bench
  python scripts/bench.py sample                # three models, under 10 minutes on 2 idle cores
  python scripts/bench.py sample --quick        # smoke run with tiny models, seconds
  python scripts/bench.py vqvae                 # the paper's VQ-VAE-2 at 256x256, a few minutes
  python scripts/bench.py vqvae --quick         # smoke run, 32x32 and tiny channels, seconds
"""

import argparse
import copy
import datetime
import functools
import inspect
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from prior import PRESETS, PixelSNAIL, PixelSNAILConfig, get_preset  # noqa: E402
from prior.sampling import sample_cached, sample_naive  # noqa: E402
from vqvae import VQVAE2, VQVAE2Config  # noqa: E402

PRECISIONS = ("fp32", "bf16")  # bf16 means bf16 autocast, the loss staying fp32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAM_BETAS = (0.95, 0.9995)  # as in pipelines/train_pixel.py

# --quick: a smoke run of the whole path in seconds; the numbers mean nothing
QUICK_DEFAULTS = dict(preset="tiny", steps=3, warmup=1, matmul_size=256, matmul_repeats=3)
FULL_DEFAULTS = dict(preset="cifar10", steps=5, warmup=2, matmul_size=4096, matmul_repeats=5)


# -- the machine ------------------------------------------------------------------------------


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average():
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def machine_info():
    flags = cpu_flags()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "load_average_before": load_average(),
    }


class OtherCpuUse:
    """Measures how much of the machine's CPU other processes (and the hypervisor) took.

    busy time of all CPUs (/proc/stat, steal included) minus this process's own CPU time,
    as a fraction of wall time x CPU count: 0 means we had the machine to ourselves.
    """

    def __enter__(self):
        self.start = (self.machine_busy_seconds(), self.own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        machine, own, wall = self.machine_busy_seconds(), self.own_seconds(), time.perf_counter()
        elapsed = wall - self.start[2]
        others = (machine - self.start[0]) - (own - self.start[1])
        self.fraction = max(0.0, others) / (elapsed * (os.cpu_count() or 1)) if elapsed > 0 else 0.0

    @staticmethod
    def machine_busy_seconds():
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0.0
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def own_seconds():
        times = os.times()
        return times.user + times.system


# -- matmul peak ------------------------------------------------------------------------------


def time_matmul(a, b):
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


def measure_matmul_peak(size, repeats):
    """Best (and median) FLOP/s of a size x size matmul per precision, repeats interleaved."""
    generator = torch.Generator().manual_seed(0)
    operands = {}
    for name, dtype in DTYPES.items():
        a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
        time_matmul(a, b)  # warm-up: thread pool, oneDNN kernels, page faults
        operands[name] = (a, b)
    seconds = {name: [] for name in DTYPES}
    for _ in range(repeats):
        for name, (a, b) in operands.items():
            seconds[name].append(time_matmul(a, b))
    flops = 2 * size**3
    return {
        name: {
            "size": size,
            "flops_per_s": flops / min(times),
            "median_flops_per_s": flops / statistics.median(times),
            "seconds": times,
        }
        for name, times in seconds.items()
    }


# -- training ---------------------------------------------------------------------------------


def random_pixels(batch_size, shape, generator):
    """Images on the 256-value grid of [-1, 1], like the data loader produces."""
    return torch.randint(0, 256, (batch_size, 3, *shape), generator=generator) / 127.5 - 1


def autocast(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def forward_backward(model, x, precision):
    with autocast(precision):
        out = model(x)
    loss = model.output_nll(x, out).mean()  # fp32 inside
    loss.backward()
    return loss


def train_step(model, optimizer, x, precision):
    forward_backward(model, x, precision)
    optimizer.step()
    optimizer.zero_grad()


def cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FlopCounterMode knows the CUDA attention kernels but not the one SDPA runs on CPU:
# give it torch's own SDPA formulas for that one (full N x N scores, backward recomputing them)
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_attention_backward_flops,
}
FLOP_COUNT_METHOD = (
    "torch.utils.flop_counter.FlopCounterMode over one forward + loss + backward at the benchmark's "
    "batch size. It counts convolutions (forward and backward) and matmuls; SDPA on CPU runs "
    "aten._scaled_dot_product_flash_attention_for_cpu, which the counter does not know, so torch's own "
    "SDPA formulas were registered for it (full N x N scores, as for the CUDA kernels; the causal CPU kernel "
    "skips roughly half of those blocks). Elementwise ops, the loss and the Adam update are not counted."
)


def count_step_flops(model, x, precision):
    """FLOPs of one forward + backward, in total and per aten op."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        forward_backward(model, x, precision)
    model.zero_grad()
    by_op = {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}
    return {"total": counter.get_total_flops(), "by_op": by_op}


def make_models(preset_name, x, seed):
    """One model per precision, identical weights after the data-dependent init."""
    torch.manual_seed(seed)
    model = PixelSNAIL(get_preset(preset_name).model)
    model.init_from_data(x)
    model.train()
    models = {name: copy.deepcopy(model) for name in PRECISIONS}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-4, betas=ADAM_BETAS) for name, m in models.items()}
    return models, optimizers, model.num_parameters()


def time_interleaved(runs, rounds, warmup, progress=None):
    """Seconds of each call of several variants (runs: name -> callable), and other processes'
    CPU use during each. `warmup` untimed calls of each first; then `rounds` rounds of one timed
    call of each, the order alternating (a, b, c, then c, b, a, ...) so drifting background load
    hits all alike. progress: a label to log each round's times under (None: silent)."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    seconds = {name: [] for name in names}
    other_cpu = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            with OtherCpuUse() as contention:
                start = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - start)
            other_cpu[name].append(contention.fraction)
        if progress:
            log(f"  {progress} round {round_index + 1}/{rounds}: " + ", ".join(
                f"{name} {seconds[name][-1]:.3g} s (other CPU {other_cpu[name][-1]:.0%})" for name in names))
    return seconds, other_cpu


def time_training(models, optimizers, x, steps, warmup):
    """Seconds per step for each precision. Rounds alternate the order (fp32 then bf16, then
    bf16 then fp32, ...) so drifting background load hits both alike."""
    runs = {name: functools.partial(train_step, models[name], optimizers[name], x, name) for name in PRECISIONS}
    return time_interleaved(runs, steps, warmup)


def summarise_training(seconds, other_cpu, step_flops, peaks):
    results = {}
    for name in PRECISIONS:
        median_seconds = statistics.median(seconds[name])
        achieved = step_flops[name]["total"] / median_seconds
        results[name] = {
            "steps_per_s": 1 / median_seconds,
            "median_step_s": median_seconds,
            "min_step_s": min(seconds[name]),
            "max_step_s": max(seconds[name]),
            "step_seconds": seconds[name],
            "other_cpu_use": other_cpu[name],
            "achieved_flops_per_s": achieved,
            "fraction_of_peak": achieved / peaks[name]["flops_per_s"],  # same precision's peak
            "fraction_of_fp32_peak": achieved / peaks["fp32"]["flops_per_s"],
        }
    return results


def paired_speedups(seconds, base="fp32", other="bf16"):
    """base time / other time of each round (fp32 / bf16 by default): the ratio with the least
    exposure to load drift."""
    return [b / o for b, o in zip(seconds[base], seconds[other])]


def apply_defaults(args, defaults):
    """Fills the options left unset (None) on the command line from `defaults`."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def run_train(args):
    """Measures, in one run: the fp32 and bf16 matmul peak (best of several n x n matmuls), then
    training steps/s of a preset in fp32 and in bf16 autocast (forward, bits/dim loss, backward,
    Adam step, zero_grad; interleaved, median of the timed steps), the model FLOPs of a step as
    FlopCounterMode counts them, the achieved FLOP/s and its fraction of the matmul peak.
    Prints a table and writes train.json and train.md to --out."""
    apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    batch_size = args.batch_size or preset.batch_size
    info = machine_info()

    log(f"matmul peak: {args.matmul_size}^2, best of {args.matmul_repeats}")
    peaks = measure_matmul_peak(args.matmul_size, args.matmul_repeats)

    generator = torch.Generator().manual_seed(args.seed)
    x = random_pixels(batch_size, preset.model.shape, generator)
    models, optimizers, n_parameters = make_models(args.preset, x, args.seed)
    log(f"counting FLOPs of one step of {args.preset} ({n_parameters / 1e6:.1f}M parameters, batch {batch_size})")
    step_flops = {name: count_step_flops(models[name], x, name) for name in PRECISIONS}
    log(f"training: {args.warmup} warm-up + {args.steps} timed steps per precision, interleaved")
    seconds, other_cpu = time_training(models, optimizers, x, args.steps, args.warmup)

    training = summarise_training(seconds, other_cpu, step_flops, peaks)
    paired = paired_speedups(seconds)
    results = {
        "benchmark": "train",
        **info,
        "load_average_after": load_average(),
        "config": {
            "preset": args.preset,
            "batch_size": batch_size,
            "image_shape": [3, *preset.model.shape],
            "parameters": n_parameters,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "matmul_size": args.matmul_size,
            "matmul_repeats": args.matmul_repeats,
            "optimizer": f"Adam betas={ADAM_BETAS}",
            "bf16": "torch.autocast('cpu', dtype=torch.bfloat16) around the forward; loss in fp32",
        },
        "matmul_peak": peaks,
        "flops_per_step": step_flops,
        "flop_count_method": FLOP_COUNT_METHOD,
        "train": training,
        "bf16_speedup": training["bf16"]["steps_per_s"] / training["fp32"]["steps_per_s"],
        "bf16_speedup_paired_median": statistics.median(paired),
        "bf16_speedup_paired": paired,
        "matmul_bf16_speedup": peaks["bf16"]["flops_per_s"] / peaks["fp32"]["flops_per_s"],
    }
    print(format_train_table(results))
    write_results(results, Path(args.out), "train", format_train_markdown(results))


# -- sampling ---------------------------------------------------------------------------------

SAMPLERS = {"naive": sample_naive, "cached": sample_cached}
SAMPLING_SCALING = (
    "A sampler timed on its first K of the grid's N positions (raster order, the real sampler "
    "stopped after its K-th draw) is scaled to the whole grid as: time to the first draw (setup and "
    "position 0) + (time from the first to the K-th draw) x (N - 1) / (K - 1). Each naive step is a "
    "full forward over the whole grid, whose cost does not depend on the position, so its prefix is "
    "a faithful per-position cost. The cached sampler is timed on the whole grid unless marked "
    "'scaled' (a run is cut short and scaled when it exceeds --cached-budget seconds); with "
    "attention its per-position cost grows with the position (keys 0..p-1), without attention it "
    "does not depend on the position either."
)
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


def random_inputs(config, batch_size, generator):
    """(x, label, cond) of the model's kinds, label and cond None where the model takes none."""
    if config.pixel_mode:
        x = random_pixels(batch_size, config.shape, generator)
    else:
        x = torch.randint(0, config.n_codes, (batch_size, *config.shape), generator=generator)
    label = torch.randint(0, config.n_classes, (batch_size,), generator=generator) if config.n_classes else None
    cond = None
    if config.cond_codes is not None:
        cond = torch.randint(0, config.cond_codes, (batch_size, *config.cond_shape), generator=generator)
    return x, label, cond


class StopSampling(Exception):
    pass


class DrawRecorder:
    """Runs a sampler with `model.draw` wrapped: timestamps each draw, keeps the first `keep`
    draws and the outputs they were drawn from, and stops the sampler after `limit` draws or
    once `budget_s` seconds have passed.

    The sampler itself is untouched: an instance attribute shadows the method while the
    recorder is active, and the real `draw` does the drawing (so generators are consumed as usual).
    """

    def __init__(self, model, limit, keep, budget_s=None):
        self.model, self.limit, self.keep, self.budget_s = model, limit, keep, budget_s
        self.times, self.draws, self.outputs = [], [], []
        self.start = None

    def draw(self, out, generator=None, temperature=1.0):
        drawn = type(self.model).draw(self.model, out, generator, temperature)
        self.times.append(time.perf_counter())
        if len(self.draws) < self.keep:
            self.draws.append(drawn.clone())
            self.outputs.append(out.float().clone())
        if len(self.times) == self.limit:
            raise StopSampling
        if self.budget_s is not None and self.times[-1] - self.start > self.budget_s and len(self.times) > 1:
            raise StopSampling
        return drawn

    def run(self, sampler, *args):
        self.model.draw = self.draw
        try:
            self.start = time.perf_counter()
            sampler(self.model, *args)
        except StopSampling:
            pass
        finally:
            del self.model.draw
        return self


def prefix_timing(recorder, n_positions):
    """A sampler run's times from its draws' timestamps, scaled to the whole grid when the run
    stopped early (see SAMPLING_SCALING)."""
    times = recorder.times
    positions = len(times)
    first = times[0] - recorder.start  # setup + position 0
    per_position = (times[-1] - times[0]) / (positions - 1) if positions > 1 else first
    return {
        "timed_positions": positions,
        "seconds": times[-1] - recorder.start,
        "first_draw_s": first,
        "seconds_per_position": per_position,
        "total_s": first + per_position * (n_positions - 1),
        "scaled": positions < n_positions,
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


def run_sample(args):
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
    writes sample.json and sample.md to --out."""
    if args.quick and args.threads is None:
        args.threads = 1  # tiny models: two threads mostly wait on each other when other jobs hold the cores
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    info = machine_info()
    cases = sample_cases(args.quick)
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
    print(format_sample_table(results))
    write_results(results, Path(args.out), "sample", format_sample_markdown(results))


# -- VQ-VAE-2 ---------------------------------------------------------------------------------

# variant -> (precision, channels_last): bf16 is bf16 autocast, the quantizer staying fp32 inside
VQVAE_VARIANTS = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "bf16_channels_last": ("bf16", True),
    "fp32_channels_last": ("fp32", True),
}
VQVAE_DEFAULT_VARIANTS = ["fp32", "bf16", "bf16_channels_last"]
VQVAE_LR = 3e-4  # Adam with torch's default betas, as pipelines/train_vqvae.py
VQVAE_QUICK_MODEL = VQVAE2Config(channels=16, res_channels=8, n_res_blocks=1, top_codes=16, bottom_codes=16, code_dim=8)
# --quick runs one thread: on a tiny model two threads mostly wait on each other, seconds per step
# when other jobs hold the cores
VQVAE_QUICK_DEFAULTS = dict(size=32, batch_size=4, steps=2, warmup=1, extract_batch_size=8, extract_batches=2, threads=1)
VQVAE_FULL_DEFAULTS = dict(size=256, batch_size=8, steps=10, warmup=2, extract_batch_size=32, extract_batches=6,
                           threads=None)


def to_memory_format(variant, model, x):
    """The model and the input in the variant's memory format (channels_last or as they are)."""
    if VQVAE_VARIANTS[variant][1]:
        return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, x


def vqvae_train_step(model, optimizer, x, precision):
    """As pipelines/train_vqvae.py runs a step (without its gradient clipping): the forward,
    with its fp32 losses, under autocast; backward, Adam step and zero_grad outside it."""
    with autocast(precision):
        loss = model(x).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def vqvae_extract(model, x, precision):
    """(top codes, bottom codes) of a batch: eval mode, no gradients, as code extraction runs."""
    with torch.no_grad(), autocast(precision):
        return model.encode(x)


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


def run_vqvae(args):
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
        "config": {
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
        },
        "train": train,
        "extract": extract,
    }
    print(format_vqvae_table(results))
    write_results(results, Path(args.out), "vqvae", format_vqvae_markdown(results))


# -- output -----------------------------------------------------------------------------------


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def gflops(flops_per_s):
    return f"{flops_per_s / 1e9:.4g} GFLOP/s"


def train_rows(results):
    """(label, fp32 text, bf16 text) rows shared by the terminal table and the markdown."""
    peaks, train, flops = results["matmul_peak"], results["train"], results["flops_per_step"]
    size = results["config"]["matmul_size"]

    def both(format_one):
        return tuple(format_one(name) for name in PRECISIONS)

    return [
        (f"matmul peak ({size}x{size}, best)", *both(lambda p: gflops(peaks[p]["flops_per_s"]))),
        ("training steps/s (median)", *both(lambda p: f"{train[p]['steps_per_s']:.4g}")),
        ("seconds/step (median [min, max])",
         *both(lambda p: f"{train[p]['median_step_s']:.3g} [{train[p]['min_step_s']:.3g}, {train[p]['max_step_s']:.3g}]")),
        ("model GFLOP per step (counted)", *both(lambda p: f"{flops[p]['total'] / 1e9:.4g}")),
        ("achieved model FLOP/s", *both(lambda p: gflops(train[p]["achieved_flops_per_s"]))),
        ("fraction of same-precision peak", *both(lambda p: f"{train[p]['fraction_of_peak']:.1%}")),
        ("fraction of fp32 peak", *both(lambda p: f"{train[p]['fraction_of_fp32_peak']:.1%}")),
        ("other processes' CPU use (median)", *both(lambda p: f"{statistics.median(train[p]['other_cpu_use']):.0%}")),
    ]


def attention_share(results):
    counts = results["flops_per_step"]["fp32"]
    attention = sum(v for op, v in counts["by_op"].items() if "attention" in op)
    return attention / counts["total"] if counts["total"] else 0.0


def train_summary_lines(results):
    c = results["config"]
    return [
        f"{c['preset']} preset, {c['parameters'] / 1e6:.1f}M parameters, batch {c['batch_size']}, "
        f"{c['timed_steps']} timed steps per precision after {c['warmup_steps']} warm-up, interleaved",
        f"bf16/fp32 training speed-up: {results['bf16_speedup']:.2f}x "
        f"(per-round paired median {results['bf16_speedup_paired_median']:.2f}x); "
        f"matmul peak bf16/fp32: {results['matmul_bf16_speedup']:.2f}x",
        f"attention (SDPA, counted with torch's formulas registered for the CPU kernel): "
        f"{attention_share(results):.1%} of the step's FLOPs",
        *machine_lines(results),
    ]


def text_table(header, rows):
    """Left-aligned columns two spaces apart, a dashed line under the header."""
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def markdown_table(header, rows):
    def line(cells):
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def machine_lines(results):
    return [
        f"{results['cpu']}, {results['threads']} threads, torch {results['torch']}, {results['date']}",
        f"load average before/after: {results['load_average_before']} / {results['load_average_after']}",
    ]


def format_train_table(results):
    lines = text_table(("", "fp32", "bf16 autocast"), train_rows(results))
    return "\n".join(["", *lines, "", *train_summary_lines(results), ""])


def format_train_markdown(results):
    lines = [
        "# Training benchmark",
        "",
        f"`{results['command']}`",
        "",
        *markdown_table(("", "fp32", "bf16 autocast"), train_rows(results)),
        "",
        *(f"- {line}" for line in train_summary_lines(results)),
        f"- FLOP count: {results['flop_count_method']}",
        "",
    ]
    return "\n".join(lines)


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


def seconds(value):
    if value >= 100:
        return f"{value:.0f} s"
    return f"{value:.3g} s" if value >= 0.1 else f"{value * 1e3:.3g} ms"


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
    if results["quick"]:
        lines.insert(0, "--quick: tiny models, the numbers mean nothing")
    return lines


def format_sample_table(results):
    lines = text_table(SAMPLE_HEADER, sample_rows(results))
    return "\n".join(["", *lines, "", *sample_summary_lines(results), ""])


def format_sample_markdown(results):
    lines = [
        "# Sampling benchmark: naive vs cached",
        "",
        f"`{results['command']}`",
        "",
        *markdown_table(SAMPLE_HEADER, sample_rows(results)),
        "",
        *(f"- {line}" for line in sample_summary_lines(results)),
        "",
    ]
    return "\n".join(lines)


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
    if results["quick"]:
        lines.insert(0, "--quick: 32x32 images and a tiny model, the numbers mean nothing")
    return lines


def format_vqvae_table(results):
    header, *rows = vqvae_rows(results)
    return "\n".join(["", *text_table(header, rows), "", *vqvae_summary_lines(results), ""])


def format_vqvae_markdown(results):
    header, *rows = vqvae_rows(results)
    lines = [
        "# VQ-VAE-2 benchmark: training and code extraction, fp32 vs bf16 autocast vs channels_last",
        "",
        f"`{results['command']}`",
        "",
        *markdown_table(header, rows),
        "",
        *(f"- {line}" for line in vqvae_summary_lines(results)),
        "",
    ]
    return "\n".join(lines)


def write_results(results, out_dir, name, markdown):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    log(f"wrote {out_dir / name}.json and .md")


# -- command line -----------------------------------------------------------------------------


def add_train_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="matmul peak and training steps/s, fp32 vs bf16 autocast",
        description=inspect.cleandoc(run_train.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    full, quick = FULL_DEFAULTS, QUICK_DEFAULTS
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run in seconds: {', '.join(f'{k}={v}' for k, v in quick.items())}")
    p.add_argument("--preset", choices=list(PRESETS), help=f"model to train (default {full['preset']})")
    p.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    p.add_argument("--steps", type=int, help=f"timed steps per precision (default {full['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps per precision first (default {full['warmup']})")
    p.add_argument("--matmul-size", type=int, help=f"n of the n x n matmuls (default {full['matmul_size']})")
    p.add_argument("--matmul-repeats", type=int, help=f"timed matmuls per precision (default {full['matmul_repeats']})")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"),
                   help="directory for train.json and train.md (default bench/results)")
    p.set_defaults(run=run_train)


def add_sample_parser(subparsers):
    p = subparsers.add_parser(
        "sample", help="naive vs cached sampling time for three models",
        description=inspect.cleandoc(run_sample.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smoke run in seconds with tiny models, 1 round, 1 thread")
    p.add_argument("--models", nargs="+", choices=list(sample_cases(False)), help="which models (default all)")
    p.add_argument("--rounds", type=int, help="timed runs per sampler and model, interleaved (default 3)")
    p.add_argument("--naive-positions", type=int,
                   help="positions the naive sampler is timed on (default top 16, bottom 6, cpu-small 64)")
    p.add_argument("--cached-positions", type=int, help="positions the cached sampler is timed on (default the whole grid)")
    p.add_argument("--cached-budget", type=float, default=CACHED_BUDGET_S,
                   help=f"seconds after which a cached run stops and is scaled (default {CACHED_BUDGET_S})")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the inputs and the draws")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"),
                   help="directory for sample.json and sample.md (default bench/results)")
    p.set_defaults(run=run_sample)


def add_vqvae_parser(subparsers):
    p = subparsers.add_parser(
        "vqvae", help="VQ-VAE-2 training and extraction images/s, fp32 vs bf16 vs bf16 + channels_last",
        description=inspect.cleandoc(run_vqvae.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    full, quick = VQVAE_FULL_DEFAULTS, VQVAE_QUICK_DEFAULTS
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run in seconds with a tiny model: {', '.join(f'{k}={v}' for k, v in quick.items())}")
    p.add_argument("--variants", nargs="+", choices=list(VQVAE_VARIANTS),
                   help=f"what to compare (default {' '.join(VQVAE_DEFAULT_VARIANTS)})")
    p.add_argument("--size", type=int, help=f"image side, a multiple of 8 (default {full['size']})")
    p.add_argument("--batch-size", type=int, help=f"training images per step (default {full['batch_size']})")
    p.add_argument("--steps", type=int, help=f"timed training steps per variant (default {full['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed training steps per variant first (default {full['warmup']})")
    p.add_argument("--extract-batch-size", type=int,
                   help=f"images per extraction batch (default {full['extract_batch_size']})")
    p.add_argument("--extract-batches", type=int,
                   help=f"timed extraction batches per variant (default {full['extract_batches']})")
    p.add_argument("--extract-warmup", type=int, default=1, help="untimed extraction batches per variant first")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the images")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"),
                   help="directory for vqvae.json and vqvae.md (default bench/results)")
    p.set_defaults(run=run_vqvae)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="{train,sample,vqvae}")
    add_train_parser(subparsers)
    add_sample_parser(subparsers)
    add_vqvae_parser(subparsers)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
