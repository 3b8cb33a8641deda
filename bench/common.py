"""What every benchmark shares: the machine's description, other processes' CPU use, interleaved
timing, the tables (terminal and markdown) and the results files."""

import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipelines.device import cpu_flags, cpu_info

ROOT = Path(__file__).resolve().parents[1]


# -- the machine ------------------------------------------------------------------------------


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    return cpu_info().get("model name") or platform.processor() or "unknown"


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
    include_children: this process's children count as its own too (DataLoader workers; only
    children that ended and were waited for before __exit__ are counted by the system).
    """

    def __init__(self, include_children=False):
        self.include_children = include_children

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

    def own_seconds(self):
        times = os.times()
        children = times.children_user + times.children_system if self.include_children else 0.0
        return times.user + times.system + children


# -- inputs and timing ------------------------------------------------------------------------


def random_pixels(batch_size, shape, generator=None):
    """Images on the 256-value grid of [-1, 1], like the data loader produces."""
    return torch.randint(0, 256, (batch_size, 3, *shape), generator=generator) / 127.5 - 1


def autocast(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


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


# -- command line -----------------------------------------------------------------------------


def apply_defaults(args, defaults):
    """Fills the options left unset (None) on the command line from `defaults`."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def add_quick_argument(parser, quick_defaults):
    """--quick, whose help lists the settings it stands for."""
    settings = ", ".join(f"{key}={value}" for key, value in quick_defaults.items())
    parser.add_argument("--quick", action="store_true", help=f"smoke run in seconds: {settings}")


def add_common_arguments(parser, name, seed_help):
    """The options every benchmark ends with: --threads, --seed, and --out for name.json and name.md."""
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"),
                        help=f"directory for {name}.json and {name}.md (default bench/results)")


# -- output -----------------------------------------------------------------------------------


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def seconds(value):
    if value >= 100:
        return f"{value:.0f} s"
    return f"{value:.3g} s" if value >= 0.1 else f"{value * 1e3:.3g} ms"


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


@dataclass(frozen=True)
class Report:
    """How a benchmark shows its results: a table and notes under it, printed in the terminal and
    written as `name`.md (a title, the command that made the results, the table, the notes as a
    list) beside `name`.json."""

    name: str
    title: str
    table: Callable  # results -> (header, rows, notes)
    quick: str = ""  # what a --quick run measures, said first in its notes

    def parts(self, results):
        """(header, rows, notes) of `results`; a --quick run's notes say first that its numbers mean nothing."""
        header, rows, notes = self.table(results)
        if results.get("quick") and self.quick:
            notes = [f"--quick: {self.quick}, the numbers mean nothing", *notes]
        return header, rows, notes

    def text(self, results):
        header, rows, notes = self.parts(results)
        return "\n".join(["", *text_table(header, rows), "", *notes, ""])

    def markdown(self, results):
        header, rows, notes = self.parts(results)
        lines = [f"# {self.title}", "", f"`{results['command']}`", "", *markdown_table(header, rows), "",
                 *(f"- {line}" for line in notes), ""]
        return "\n".join(lines)

    def publish(self, results, out_dir):
        print(self.text(results))
        write_results(results, Path(out_dir), self.name, self.markdown(results))


def write_results(results, out_dir, name, markdown):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    log(f"wrote {out_dir / name}.json and .md")


def results_record(name, info, quick, config, **measured):
    """A benchmark's results: its name, the machine (`info`, from machine_info() before the run) with the
    load average after it, whether it was --quick, its config and what it measured."""
    return {"benchmark": name, **info, "load_average_after": load_average(), "quick": quick, "config": config,
            **measured}
