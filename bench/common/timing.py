"""Timing: variants interleaved round by round, a sampler's draws timestamped and scaled to the
whole grid, the machine's matmul peak, and the FLOPs of attention on the CPU."""

import time

import torch
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from bench.common.machine import OtherCpuUse
from bench.common.report import log

# -- variants interleaved ---------------------------------------------------------------------


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


def paired_speedups(seconds, base="fp32", other="bf16"):
    """base time / other time of each round (fp32 / bf16 by default): the ratio with the least
    exposure to load drift."""
    return [b / o for b, o in zip(seconds[base], seconds[other])]


# -- a sampler's draws ------------------------------------------------------------------------


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

    def draw(self, out, generator=None, *drawing):
        drawn = type(self.model).draw(self.model, out, generator, *drawing)
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
        if not self.times:
            raise RuntimeError("the sampler never called model.draw: the recorder timed nothing")
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


# -- the matmul peak --------------------------------------------------------------------------


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (m, k, n) of the matmuls whose best FLOP/s is the machine's peak: square ones, and the tall
# and thin shapes a convolution over a batch of 32x32 maps becomes
MATMUL_SHAPES = [(4096, 4096, 4096), (2048, 2048, 2048), (8192, 1024, 512), (8192, 2048, 1024)]
QUICK_MATMUL_SHAPES = [(256, 256, 256)]


def time_matmul(a, b):
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


def measure_matmul_peak(shapes, repeats):
    """Per precision: the best FLOP/s over the shapes and repeats (interleaved), and the shape."""
    generator = torch.Generator().manual_seed(0)
    best = {}
    for m, k, n in shapes:
        operands = {}
        for name, dtype in DTYPES.items():
            operands[name] = (torch.randn(m, k, generator=generator).to(dtype),
                              torch.randn(k, n, generator=generator).to(dtype))
            time_matmul(*operands[name])  # warm-up: thread pool, oneDNN kernels, page faults
        for _ in range(repeats):
            for name, (a, b) in operands.items():
                flops_per_s = 2 * m * k * n / time_matmul(a, b)
                if flops_per_s > best.get(name, {}).get("flops_per_s", 0):
                    best[name] = {"flops_per_s": flops_per_s, "shape": [m, k, n]}
    return best


# -- FLOPs of attention on the CPU ------------------------------------------------------------


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
