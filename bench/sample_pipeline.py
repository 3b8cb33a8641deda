"""`python -m bench sample --pipeline`: hierarchical samples at the paper's size on this CPU.

`--hierarchy imagenet256` (the default, 16 samples): the top prior (`vqvae2-top`, 32x32 codes)
samples, the bottom prior (`vqvae2-bottom`, 64x64 codes) samples given top codes, the paper's
VQ-VAE decodes both to 256x256. `--hierarchy ffhq1024` (4 samples): the FFHQ-1024 model's three
priors (`vqvae2-ffhq-top` 32x32, `-middle` 64x64, `-bottom` 128x128), each level given codes of
the level above, decoded to 1024x1024 by `vqvae2-ffhq1024`. Random weights, in fp32 and under the
bf16 autocast scripts/sample.py uses (pipelines.device.Runtime). Each level
is timed on a prefix of its positions with the DrawRecorder and scaled to the whole grid (see
bench.common's SAMPLING_SCALING); the prefix is one whole row and the next row's first position, so
the per-position figure includes one row start (the work the cached sampler does once per row).

The model FLOPs of the cached step are counted by torch's FlopCounterMode over the same prefix
(every convolution, matmul and attention the sampler runs between the first and the last draw,
the row start included), divided by the positions; the bytes of weights (and attention keys and
values) those operations read are counted beside them. Both are set against the machine's bf16
matmul peak and its memory bandwidth, measured in the same run.
"""

import time
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench.common import (CPU_ATTENTION_FLOPS, MATMUL_SHAPES, QUICK_MATMUL_SHAPES, VQVAE_QUICK_MODEL, DrawRecorder,
                          Report, load_average, log, machine_info, machine_lines, measure_matmul_peak, prefix_timing,
                          random_inputs, seconds, time_interleaved)
from pipelines.device import make_runtime
from prior import PixelSNAIL, get_preset
from prior.noise import SampleKeys
from prior.sampling import sample_cached
from vqvae import VQVAE2, VQVAE2Config
from vqvae.presets import get_preset as vqvae_preset


@dataclass(frozen=True)
class Hierarchy:
    """A VQ-VAE-2 model benchmarked whole: its priors (level -> preset), its VQ-VAE, the image side
    and the samples drawn; and their tiny stand-ins for --quick."""

    levels: dict
    vqvae: VQVAE2Config
    image_size: int
    n_samples: int
    quick_levels: dict
    quick_vqvae: VQVAE2Config
    report_name: str


QUICK_LEVELS = {"top": "cpu-top", "bottom": "cpu-bottom"}
HIERARCHIES = {
    "imagenet256": Hierarchy({"top": "vqvae2-top", "bottom": "vqvae2-bottom"}, VQVAE2Config(), 256, 16,
                             QUICK_LEVELS, VQVAE_QUICK_MODEL, "sample-pipeline"),
    # quick: the cpu presets stand in for the three levels (each conditioned on random codes of its own cond grid)
    "ffhq1024": Hierarchy({"top": "vqvae2-ffhq-top", "middle": "vqvae2-ffhq-middle", "bottom": "vqvae2-ffhq-bottom"},
                          vqvae_preset("vqvae2-ffhq1024").model, 1024, 4,
                          {"top": "cpu-top", "middle": "cpu-bottom", "bottom": "cpu-bottom"},
                          replace(VQVAE_QUICK_MODEL, levels=3), "sample-pipeline-ffhq1024"),
}
LEVELS = HIERARCHIES["imagenet256"].levels
PRECISIONS = ("fp32", "bf16")
BANDWIDTH_BYTES = 2**30  # larger than any cache of this machine
QUICK_BANDWIDTH_BYTES = 2**26
TARGET, GOAL = 0.10, 0.25  # of the bf16 matmul peak
FLOP_COUNT_METHOD = (
    "torch.utils.flop_counter.FlopCounterMode over the timed prefix of the real cached sampler (bf16), from "
    "the first to the last draw: every convolution and matmul (2 FLOPs per multiply-add) and the attention "
    "over the cached keys (torch's SDPA formula), the row start included; divided by the positions. Not "
    "counted: elementwise ops, the draws. Weight bytes: the bytes of every weight operand of those ops (and "
    "of the attention's keys and values) in the precision they run in: what one position streams from memory."
)


def build_prior(preset, n, seed):
    """A prior of `preset` with random weights, data-initialised on one random example (in bf16:
    the statistics need only be sane), and a label / top-code condition to sample n with."""
    config = get_preset(preset).model
    torch.manual_seed(seed)
    model = PixelSNAIL(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.init_from_data(*random_inputs(config, 1, generator))
    _, label, cond = random_inputs(config, n, generator)
    return model.eval(), label, cond


class WeightBytes(TorchDispatchMode):
    """Bytes of the weight operands of matmuls and convolutions, and of attention's keys and values."""

    OPERANDS = {torch.ops.aten.mm.default: (1,), torch.ops.aten.addmm.default: (2,),
                torch.ops.aten.convolution.default: (1,), torch.ops.aten.bmm.default: (1,)}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indices = self.OPERANDS.get(func, (1, 2) if "scaled_dot_product" in str(func) else ())
        self.bytes += sum(args[i].numel() * args[i].element_size() for i in indices)
        return func(*args, **(kwargs or {}))


class CountingRecorder(DrawRecorder):
    """A DrawRecorder that also reads the FLOP and weight-byte counters at every draw."""

    def __init__(self, model, limit, flops, weight_bytes):
        super().__init__(model, limit, keep=0)
        self.counters, self.counts = (flops, weight_bytes), []

    def draw(self, out, generator=None, *drawing):
        self.counts.append((self.counters[0].get_total_flops(), self.counters[1].bytes))
        return super().draw(out, generator, *drawing)


def count_step(model, n, label, cond, positions, seed):
    """FLOPs and weight bytes per position over positions 1..positions-1 of the cached sampler, bf16."""
    with (make_runtime("cpu", "bf16").autocast(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
          as flops, WeightBytes() as weight_bytes):
        recorder = CountingRecorder(model, positions, flops, weight_bytes)
        recorder.run(sample_cached, n, label, cond, torch.Generator().manual_seed(seed))
    (flops_0, bytes_0), (flops_k, bytes_k) = recorder.counts[0], recorder.counts[-1]
    steps = len(recorder.counts) - 1
    return {"flops_per_position": (flops_k - flops_0) / steps, "weight_bytes_per_position": (bytes_k - bytes_0) / steps}


def time_level(model, n, label, cond, positions, rounds, seed, precisions):
    """Per precision, the prefix timings of the cached sampler (DrawRecorder), interleaved rounds."""
    recorders = {precision: [] for precision in precisions}

    def sample(precision):
        recorder = DrawRecorder(model, positions, keep=0)
        with make_runtime("cpu", precision).autocast():
            recorder.run(sample_cached, n, label, cond, torch.Generator().manual_seed(seed))
        recorders[precision].append(recorder)

    _, other_cpu = time_interleaved({p: lambda p=p: sample(p) for p in precisions}, rounds, 0, progress="timing")
    n_positions = model.config.shape[0] * model.config.shape[1]
    return {precision: [{**prefix_timing(r, n_positions), "other_cpu_use": other}
                        for r, other in zip(recorders[precision], other_cpu[precision])]
            for precision in precisions}


def bench_level(level, preset, n, rounds, seed, precisions, positions=None):
    model, label, cond = build_prior(preset, n, seed)
    height, width = model.config.shape
    positions = positions or width + 1  # a whole row, and the next row's start
    log(f"{level}: {preset}, {model.num_parameters() / 1e6:.1f}M parameters, batch {n}, {height * width} "
        f"positions, timed on the first {positions}")
    counts = count_step(model, n, label, cond, positions, seed)
    runs = time_level(model, n, label, cond, positions, rounds, seed, precisions)
    medians = {p: sorted(r["seconds_per_position"] for r in runs[p])[len(runs[p]) // 2] for p in precisions}
    totals = {p: sorted(r["total_s"] for r in runs[p])[len(runs[p]) // 2] for p in precisions}
    for p in precisions:
        log(f"  {level} {p}: {seconds(medians[p])}/position, whole grid ~{seconds(totals[p])}")
    return {"preset": preset, "parameters": model.num_parameters(), "positions": height * width,
            "timed_positions": positions, **counts, "seconds_per_position": medians, "total_s": totals, "runs": runs}


def bench_decode(n, config, size, seed, precisions):
    """Seconds to decode n random code grids of every level to images, per precision, channels_last."""
    torch.manual_seed(seed)
    vqvae = VQVAE2(config)
    generator = torch.Generator().manual_seed(seed)
    grids = [torch.randint(0, n_codes, (n, *shape), generator=generator)
             for shape, n_codes in zip(vqvae.code_shapes(size), config.codebook_sizes())]
    result = {}
    for precision in precisions:
        runtime = make_runtime("cpu", precision)
        model = runtime.vqvae(vqvae)
        with torch.no_grad(), runtime.autocast():
            model.decode_codes(*(grid[:1] for grid in grids))  # warm-up
            start = time.perf_counter()
            images = model.decode_codes(*grids)
            result[precision] = time.perf_counter() - start
    result["image_shape"] = list(images.shape)
    return result


def memory_bandwidth(size):
    """Bytes/s of the best of three reads of `size` bytes (a sum in fp32), and of the same bytes
    streamed as the weights of a batch-16 bf16 matmul: the rate a cached step's weights can arrive at."""
    data = torch.randn(size // 4)
    best_sum = min(timed(data.sum) for _ in range(3))
    weights = data.view(torch.bfloat16).view(-1, 8192)  # the bits of random floats: finite bf16 values
    x = torch.randn(16, 8192, dtype=torch.bfloat16)
    best_matmul = min(timed(lambda: x @ weights.t()) for _ in range(3))
    return {"sum_bytes_per_s": size / best_sum, "matmul_bytes_per_s": size / best_matmul}


def timed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# -- before and after: the per-sample draw loop against the batched keyed draw ----------------

BATCHES = (1, 16, 64, 256)
# the paper presets' batches stop at 64: at 256 (fp32, row starts of hundreds of GFLOP per
# convolution) vqvae2-top alone ran over 6 minutes on 2 cores without finishing (2026-12-05)
PAPER_BATCHES = (1, 16, 64)
QUICK_BATCHES = (1, 4)
PAPER_POSITIONS = 4  # positions the paper presets are timed on, after the first, then scaled


def per_sample_draw(model):
    """The model with the draw as it was before the keyed one, kept here only as the baseline: one
    softmax and one torch.multinomial per sample per position, each sample from its own torch
    generator. A subclass (DrawRecorder calls the class's draw)."""
    generators = [torch.Generator().manual_seed(k) for k in range(1024)]

    class PerSampleDraw(type(model)):
        def draw(self, out, keys=None, drawing=None, position=0):
            logits = out[:, :, 0, 0].float() / drawing.temperature
            return torch.cat([torch.multinomial(torch.softmax(logits[k : k + 1], dim=1), 1, generator=g)[:, 0]
                              for k, g in zip(range(len(out)), generators)])

    return PerSampleDraw


class OpCounter(TorchDispatchMode):
    """Counts the device ops (aten calls below autograd) run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def time_draws(model, n, label, cond, positions, baseline=None):
    """(timing, device ops per position) of the cached sampler at batch n over positions
    1..positions-1, fp32, with per-sample keys (or as the `baseline` class draws)."""
    keys = SampleKeys.of(0, range(n))
    own_class = type(model)
    model.__class__ = baseline or own_class
    try:
        recorder = DrawRecorder(model, positions, keep=0)
        recorder.run(sample_cached, n, label, cond, keys)
        with OpCounter() as counter:  # positions 0 and 1, counted from the first draw's end
            counting = CountingOps(model, counter)
            counting.run(sample_cached, n, label, cond, keys)
    finally:
        model.__class__ = own_class
    timing = prefix_timing(recorder, model.config.shape[0] * model.config.shape[1])
    return timing, counting.ops[1] - counting.ops[0]


class CountingOps(DrawRecorder):
    """A DrawRecorder of two draws that reads the op counter at each: the second less the first is
    one position's ops (output, draw, write-back)."""

    def __init__(self, model, counter):
        super().__init__(model, 2, keep=0)
        self.counter, self.ops = counter, []

    def draw(self, out, generator=None, *drawing):
        self.ops.append(self.counter.ops)
        return super().draw(out, generator, *drawing)


def bench_batches(batches_of, seed, positions):
    """Samples/s of each preset's whole grid (scaled from its timed prefix) at each of its batch sizes
    (`batches_of`: preset -> batch sizes), the per-sample draw (before) against the batched keyed draw
    (after), and the ops per position."""
    rows = []
    for preset, batches in batches_of.items():
        for n in batches:
            model, label, cond = build_prior(preset, n, seed)
            count = positions or model.config.shape[1] + 1
            for variant, baseline in (("before", per_sample_draw(model)), ("after", None)):
                timing, ops = time_draws(model, n, label, cond, count, baseline)
                rows.append({"preset": preset, "batch": n, "variant": variant, "timed_positions": count,
                             "seconds_per_position": timing["seconds_per_position"], "total_s": timing["total_s"],
                             "samples_per_s": n / timing["total_s"], "ops_per_position": ops})
                log(f"{preset} batch {n} {variant}: {n / timing['total_s']:.3g} samples/s, {ops:.0f} ops/position")
    return rows


def batch_lines(results):
    lines = []
    for row in results.get("batches", []):
        lines.append(f"{row['preset']}, batch {row['batch']}, {row['variant']}: {row['samples_per_s']:.3g} samples/s "
                     f"(whole grid scaled from {row['timed_positions']} positions), {row['ops_per_position']:.0f} "
                     "device ops per position")
    return lines


def run(args):
    """The benchmark (`python -m bench sample --pipeline`, its options those of `sample`): measures,
    writes sample-pipeline.json and .md (--hierarchy ffhq1024: sample-pipeline-ffhq1024.*) to --out."""
    if args.quick and args.threads is None:
        args.threads = 1  # tiny models: two threads mostly wait on each other when other jobs hold the cores
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure(args)
    report_of(results).publish(results, args.out)


def measure(args):
    """The results of the benchmark."""
    rounds = args.rounds or 1
    hierarchy = HIERARCHIES[args.hierarchy]
    n = args.n_samples or hierarchy.n_samples
    if unknown := sorted(set(args.models or ()) - set(hierarchy.levels)):
        raise ValueError(f"--models {' '.join(unknown)}: --hierarchy {args.hierarchy} has the levels "
                         f"{', '.join(hierarchy.levels)}")
    info = machine_info()
    log("matmul peak and memory bandwidth")
    peaks = measure_matmul_peak(QUICK_MATMUL_SHAPES if args.quick else MATMUL_SHAPES, 2 if args.quick else 3)
    bandwidth = memory_bandwidth(QUICK_BANDWIDTH_BYTES if args.quick else BANDWIDTH_BYTES)
    levels = {name: preset for name, preset in (hierarchy.quick_levels if args.quick else hierarchy.levels).items()
              if not args.models or name in args.models}
    results = {
        "benchmark": "sample --pipeline", **info, "quick": args.quick, "hierarchy": args.hierarchy, "n": n,
        "rounds": rounds,
        "seed": args.seed, "matmul_peak": peaks, "memory_bandwidth": bandwidth,
        "flop_count_method": FLOP_COUNT_METHOD, "precisions": args.precisions,
        "levels": {level: bench_level(level, preset, n, rounds, args.seed, args.precisions, args.cached_positions)
                   for level, preset in levels.items()},
    }
    if args.hierarchy == "imagenet256":  # the draw before and after (the FFHQ priors draw as these do)
        batches_of = {preset: QUICK_BATCHES if args.quick else BATCHES for preset in QUICK_LEVELS.values()}
        if not args.quick:
            batches_of.update({preset: PAPER_BATCHES for preset in LEVELS.values()})
        results["batches"] = bench_batches(batches_of, args.seed, None if args.quick else PAPER_POSITIONS)
    vqvae_config = hierarchy.quick_vqvae if args.quick else hierarchy.vqvae
    results["decode"] = bench_decode(n, vqvae_config, 32 if args.quick else hierarchy.image_size, args.seed,
                                     args.precisions)
    results["load_average_after"] = load_average()
    return results


# -- output -----------------------------------------------------------------------------------


def timed_precisions(results):
    return results.get("precisions", PRECISIONS)  # runs from before --precisions timed both


def fraction_note(fraction):
    verdict = "goal met" if fraction >= GOAL else "target met, goal not" if fraction >= TARGET else "target NOT met"
    return f"{fraction:.1%} ({verdict})"


def pipeline_header(results):
    return ("level (params)", "precision", f"s/position (batch {results['n']})", "whole grid", "model GFLOP/position",
            "GFLOP/s", "of bf16 peak", "weight GB/position", "bandwidth bound s/position")


def pipeline_rows(results):
    peak = results["matmul_peak"]["bf16"]["flops_per_s"]
    bandwidth = max(results["memory_bandwidth"].values())
    rows = []
    for level, r in results["levels"].items():
        for precision in timed_precisions(results):
            per_position = r["seconds_per_position"][precision]
            rate = r["flops_per_position"] / per_position
            # the counted bytes are bf16's; fp32 weights are twice the size
            weight_bytes = r["weight_bytes_per_position"] * (2 if precision == "fp32" else 1)
            rows.append((f"{level} ({r['parameters'] / 1e6:.0f}M)", precision, seconds(per_position),
                         f"~{seconds(r['total_s'][precision])} (scaled from {r['timed_positions']} of {r['positions']})",
                         f"{r['flops_per_position'] / 1e9:.3g}", f"{rate / 1e9:.3g}", fraction_note(rate / peak),
                         f"{weight_bytes / 1e9:.2f}", seconds(weight_bytes / bandwidth)))
    return rows


def wall_time_lines(results):
    lines = []
    for precision in timed_precisions(results):
        parts = {level: r["total_s"][precision] for level, r in results["levels"].items()}
        parts["decode"] = results["decode"][precision]
        total = sum(parts.values())
        lines.append(f"{results['n']} hierarchical samples in {precision}: ~{total / 60:.1f} minutes (~{total:.0f} s; "
                     + ", ".join(f"{name} {'' if name == 'decode' else '~'}{value:.1f} s" for name, value in parts.items())
                     + "; the levels scaled from their prefixes, the decode measured whole)")
    return lines


def pipeline_summary_lines(results):
    peaks, bandwidth = results["matmul_peak"], results["memory_bandwidth"]
    lines = wall_time_lines(results) + [
        f"bf16 matmul peak of this run: {peaks['bf16']['flops_per_s'] / 1e9:.0f} GFLOP/s at {peaks['bf16']['shape']} "
        f"(fp32 {peaks['fp32']['flops_per_s'] / 1e9:.0f} GFLOP/s); target {TARGET:.0%} of it, goal {GOAL:.0%}",
        f"memory bandwidth of this run: {bandwidth['sum_bytes_per_s'] / 1e9:.1f} GB/s reading 1 GiB (sum), "
        f"{bandwidth['matmul_bytes_per_s'] / 1e9:.1f} GB/s streaming it as the bf16 weights of a batch-16 matmul; "
        "the bound is the weight bytes of one position at the larger of the two",
        f"FLOPs and bytes: {results['flop_count_method']}",
        f"decode: {results['n']} images {results['decode']['image_shape']} with the paper's VQ-VAE (random weights, "
        "random codes), channels_last, measured whole",
        "each level below the top: conditioned on random codes of the level above (the levels are only timed on "
        "prefixes)",
        *batch_lines(results),
        *machine_lines(results),
    ]
    return lines


def report(hierarchy, title):
    return Report(HIERARCHIES[hierarchy].report_name, title,
                  lambda results: (pipeline_header(results), pipeline_rows(results), pipeline_summary_lines(results)),
                  quick="tiny models")


REPORTS = {"imagenet256": report("imagenet256", "Hierarchical sampling at the paper's size: cached step speed"),
           "ffhq1024": report("ffhq1024", "Hierarchical sampling of the FFHQ-1024 model (three levels): cached step "
                                          "speed")}
REPORT = REPORTS["imagenet256"]


def report_of(results):
    """The Report of results (those from before --hierarchy are ImageNet-256's)."""
    return REPORTS[results.get("hierarchy", "imagenet256")]
