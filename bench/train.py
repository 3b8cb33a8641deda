"""The `train` benchmark: matmul peak (fp32, bf16) and PixelSNAIL training steps/s in fp32 and in bf16
autocast, measured in one run (interleaved, so background load hits both alike), plus the model's
counted FLOPs per step, the achieved FLOP/s and its fraction of the peak."""

import copy
import functools
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from bench.common import (add_common_arguments, apply_defaults, autocast, format_markdown_report,
                          format_text_report, load_average, log, machine_info, machine_lines, paired_speedups,
                          random_pixels, time_interleaved, write_results)
from prior import PRESETS, PixelSNAIL, get_preset

PRECISIONS = ("fp32", "bf16")  # bf16 means bf16 autocast, the loss staying fp32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAM_BETAS = (0.95, 0.9995)  # as in pipelines/train_pixel.py

# --quick: a smoke run of the whole path in seconds; the numbers mean nothing
QUICK_DEFAULTS = dict(preset="tiny", steps=3, warmup=1, matmul_size=256, matmul_repeats=3)
FULL_DEFAULTS = dict(preset="cifar10", steps=5, warmup=2, matmul_size=4096, matmul_repeats=5)


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


def run(args):
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
    print(format_table(results))
    write_results(results, Path(args.out), "train", format_markdown(results))


def add_arguments(parser):
    full, quick = FULL_DEFAULTS, QUICK_DEFAULTS
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run in seconds: {', '.join(f'{k}={v}' for k, v in quick.items())}")
    parser.add_argument("--preset", choices=list(PRESETS), help=f"model to train (default {full['preset']})")
    parser.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    parser.add_argument("--steps", type=int, help=f"timed steps per precision (default {full['steps']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps per precision first (default {full['warmup']})")
    parser.add_argument("--matmul-size", type=int, help=f"n of the n x n matmuls (default {full['matmul_size']})")
    parser.add_argument("--matmul-repeats", type=int,
                        help=f"timed matmuls per precision (default {full['matmul_repeats']})")
    add_common_arguments(parser, "train", seed_help="seed of the weights and the batch")


# -- output -----------------------------------------------------------------------------------


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


TRAIN_HEADER = ("", "fp32", "bf16 autocast")


def format_table(results):
    return format_text_report(TRAIN_HEADER, train_rows(results), train_summary_lines(results))


def format_markdown(results):
    notes = [*train_summary_lines(results), f"FLOP count: {results['flop_count_method']}"]
    return format_markdown_report("Training benchmark", results, TRAIN_HEADER, train_rows(results), notes)
