"""The machine a benchmark ran on: its description, other processes' CPU use, and paths as a results
file records them (never the machine's own directories)."""

import datetime
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipelines.device import cpu_flags, cpu_info

ROOT = Path(__file__).resolve().parents[2]


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    return cpu_info().get("model name") or platform.processor() or "unknown"


def load_average():
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def recorded_path(path):
    """`path` as a results file records it: a path inside the repository relative to it, one in the
    temporary directory as <tmp>/..., one in the home directory as ~/..., any other absolute path as
    <dir>/ and its name. Relative paths, names that are no path (`builtin`) and None stay as they are.

    >>> recorded_path(ROOT / "runs" / "demo"), recorded_path("/mnt/disk/runs/demo")
    ('runs/demo', '<dir>/demo')
    """
    if path is None:
        return None
    text = str(path)
    if not text.startswith(("/", "~")):
        return text
    absolute = Path(os.path.abspath(os.path.expanduser(text)))
    for root, shown in ((ROOT, None), (Path(tempfile.gettempdir()), "<tmp>"), (Path.home(), "~")):
        for base in {root, root.resolve()} - {Path("/")}:
            if absolute.is_relative_to(base):
                inside = absolute.relative_to(base).as_posix()
                return inside if shown is None else f"{shown}/{inside}"
    return f"<dir>/{absolute.name}"


def recorded_argument(word):
    """A command-line word with its path recorded as recorded_path does (`--out=/x/y` too)."""
    if word.startswith("--") and "=" in word:
        option, value = word.split("=", 1)
        return f"{option}={recorded_path(value)}"
    return recorded_path(word)


def shell_word(word):
    """`word` quoted where a shell needs it, its placeholder (<tmp>/, <dir>/) left as it is."""
    option, placeholder, rest = re.fullmatch(r"(--[\w-]+=)?(<tmp>/|<dir>/)?(.*)", word, re.DOTALL).groups()
    if placeholder is None:
        return shlex.quote(word)
    return f"{option or ''}{placeholder}{shlex.quote(rest) if rest else ''}"


def recorded_command(arguments=None):
    """`python -m bench NAME ...` with this process's arguments (sys.argv[1:] by default), paths recorded."""
    arguments = sys.argv[1:] if arguments is None else arguments
    return " ".join(["python", "-m", "bench", *(shell_word(recorded_argument(word)) for word in arguments)])


def machine_info():
    flags = cpu_flags()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": recorded_command(),
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
