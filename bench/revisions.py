"""The same sampling command under an earlier revision of the code and under this working tree,
interleaved in one run: `scripts/sample.py` on a pipeline run (its top prior, bottom prior and
VQ-VAE), the wall time of the whole command at each batch size. What a change to the sampler
(its draw, its cached step) gained or cost, as a user sees it."""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Report, add_common_arguments, log, machine_info, machine_lines
from bench.common.machine import ROOT
from bench.common.processes import run_command
from bench.common.report import results_record

BATCH_SIZES = (1, 16, 64)
QUICK = {"n": 2, "batch_sizes": [1, 2], "rounds": 1}


def add_arguments(parser):
    parser.add_argument("--before", required=True, help="the git revision to compare with (e.g. a commit or a tag)")
    parser.add_argument("--run-dir", default="runs/demo", help="a pipeline run with vqvae/, top/ and bottom/ "
                        "(default runs/demo, what `make demo` writes)")
    parser.add_argument("--n", type=int, default=64, help="samples per command (default 64)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES),
                        help="the batch sizes to time (default 1 16 64)")
    parser.add_argument("--rounds", type=int, default=2, help="timed commands per revision and batch size, "
                        "alternating which revision goes first (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 samples at batch 1 and 2, one round")
    add_common_arguments(parser, "revisions", "--seed of the samples (default 0)")


def checkout(revision, folder):
    """The code of `revision` in a new git worktree at `folder` (no branch of its own)."""
    run_command(["git", "worktree", "add", "--detach", "--quiet", str(folder), revision])


def sample_command(tree, run_dir, n, batch_size, seed, out):
    """scripts/sample.py of the code in `tree` (run with that tree first on the import path): n samples
    of class 0 (the demo's priors are class-conditional)."""
    models = [f"--{level}" for level in ("vqvae", "top", "bottom")]
    paths = [str(Path(run_dir) / level) for level in ("vqvae", "top", "bottom")]
    pairs = [item for pair in zip(models, paths) for item in pair]
    return [sys.executable, str(Path(tree) / "scripts" / "sample.py"), *pairs, "--n", str(n), "--batch-size",
            str(batch_size), "--seed", str(seed), "--out", str(out), "--device", "cpu", "--label", "0"]


def timed_command(tree, command):
    start = time.perf_counter()
    run_command(command, env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
    return time.perf_counter() - start


def run(args):
    """Times `scripts/sample.py` (--n samples of the run's priors, whole command: start-up, loading,
    both levels drawn, decoded, the grid written) under --before and under this working tree, at each
    --batch-size, --rounds times each, alternating which goes first; the medians and their ratio.
    Writes revisions.json and revisions.md to --out."""
    if args.quick:
        args.n, args.batch_sizes, args.rounds = QUICK["n"], QUICK["batch_sizes"], QUICK["rounds"]
    info = machine_info()
    run_dir = (ROOT / args.run_dir).resolve()
    with tempfile.TemporaryDirectory() as work:
        before_tree = Path(work) / "before"
        checkout(args.before, before_tree)
        try:
            trees = {"before": before_tree, "after": ROOT}
            seconds = {name: {str(b): [] for b in args.batch_sizes} for name in trees}  # str: as JSON keys
            for round_index in range(args.rounds):
                for batch_size in args.batch_sizes:
                    order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
                    for name in order:
                        command = sample_command(trees[name], run_dir, args.n, batch_size, args.seed,
                                                 Path(work) / f"{name}.png")
                        seconds[name][str(batch_size)].append(timed_command(trees[name], command))
                        log(f"{name}, batch {batch_size}: {seconds[name][str(batch_size)][-1]:.2f} s")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, check=False)
    revision = run_command(["git", "rev-parse", "--short", args.before]).stdout.strip()
    config = {"before": revision, "run_dir": args.run_dir, "n": args.n, "batch_sizes": args.batch_sizes,
              "rounds": args.rounds, "seed": args.seed}
    REPORT.publish(results_record("revisions", info, args.quick, config, seconds=seconds), args.out)


def table(results):
    c, seconds = results["config"], results["seconds"]
    header = ["batch size", f"before ({c['before']}) s", "after s", "after / before", "after samples/s"]
    rows = []
    for batch_size in c["batch_sizes"]:
        before, after = (statistics.median(seconds[name][str(batch_size)]) for name in ("before", "after"))
        rows.append([str(batch_size), f"{before:.2f}", f"{after:.2f}", f"{after / before:.2f}", f"{c['n'] / after:.2f}"])
    notes = [f"scripts/sample.py --n {c['n']} on {c['run_dir']}'s priors and VQ-VAE, the whole command (start-up, "
             "loading, both levels, decoding, the grid written), median of "
             f"{c['rounds']} runs each, the two revisions alternating", *machine_lines(results)]
    return header, rows, notes


REPORT = Report("revisions", "Sampling under an earlier revision and under this tree, side by side", table,
                quick="2 samples")
