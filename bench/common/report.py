"""How a benchmark takes its options and shows its results: the command-line helpers every benchmark
uses, its log lines, its tables (terminal and markdown) and its results files."""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.common.machine import ROOT, load_average

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


def add_out_argument(parser, files):
    """--out, the directory for the results files (`files`, as the help names them)."""
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"),
                        help=f"directory for {files} (default bench/results)")


def add_common_arguments(parser, name, seed_help):
    """The options every benchmark ends with: --threads, --seed, and --out for name.json and name.md."""
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    add_out_argument(parser, f"{name}.json and {name}.md")


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
    written as `name`.md (a title, the results' notice if they carry one (a results file superseded
    by a later run says so), the command that made the results, the table, the notes as a list)
    beside `name`.json."""

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
        notice = [f"> {results['notice']}", ""] if results.get("notice") else []
        lines = [f"# {self.title}", "", *notice, f"`{results['command']}`", "", *markdown_table(header, rows), "",
                 *(f"- {line}" for line in notes), ""]
        return "\n".join(lines)

    def publish(self, results, out_dir):
        print(self.text(results))
        write_results(results, Path(out_dir), self.name, self.markdown(results))


def pyplot():
    """matplotlib's pyplot drawing to files only (the Agg backend), imported when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
