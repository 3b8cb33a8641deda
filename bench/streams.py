"""The `streams` benchmark: does the vertical stream help an attention-free prior?

The real prior trainer (`pipelines.train.priors.train`) trains the `cpu-bottom` preset with one
stream (the model as it was before the vertical stream: it never sees the codes up and to the
right beyond its kernel) and with two streams, on a code database (the demo's), for several seeds,
under one of two budgets: the same wall time for every run (--minutes; streams.json and .md) or
the same number of steps (--steps; streams-steps.json and .md). The two variants of a seed train
at the same time, as two processes of one thread each, so that the machine's load hits both
alike. Each run ends as the trainer ends a run: the EMA weights evaluated on the whole held-out
split (every 20th record), in validation bits per code.

Each worker times the trainer's steps (its step function wrapped): a run's seconds per step, and
per seed the two variants' step-time ratio over the time both were training side by side (at
equal steps the one-stream run finishes first; the other then has the machine to itself). The
workers' output goes to files (bench.common's runner): a pipe they fill would stall them, as it
stalled the two-stream worker of the first version of this benchmark at step 435.

Run as `python -m bench.streams JSON` it is one of those workers (JSON: train_variant's arguments).
"""

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import (ROOT, Report, add_out_argument, load_average, log, machine_info, machine_lines, recorded_path,
                          run_together)
from pipelines.store.run_files import LOG_FILE

PRESET = "cpu-bottom"
VARIANTS = ("one", "two")  # the model's `streams`
FULL_DEFAULTS = dict(minutes=4.0, seeds=3, codes=str(ROOT / "runs" / "demo" / "codes.lmdb"))
QUICK_DEFAULTS = dict(minutes=0.05, seeds=1)
MAX_STEPS = 1_000_000  # at equal wall time: more than any run reaches, the time budget ends every run


def variant_preset(streams):
    return f"{PRESET}-{streams}"


def timing_steps(loop):
    """Wraps the trainers' step function, `loop.train_step` (the loop calls it by that name), to
    record the monotonic clock (one clock for every process) before the first step and after each
    -> that list of times, filled as the trainer runs."""
    times, step = [], loop.train_step

    def timed_step(*args, **kwargs):
        if not times:
            times.append(time.monotonic())
        result = step(*args, **kwargs)
        times.append(time.monotonic())
        return result

    loop.train_step = timed_step
    return times


def train_variant(run_dir, streams, seed, codes, minutes=None, steps=None):
    """In a worker process of one thread: registers the variant as a preset (the trainer takes
    presets by name) and trains it for `minutes` or for `steps`; prints one JSON line with the
    result, the times of its steps among it."""
    import torch

    from pipelines.train import loop, priors
    from prior.presets import PRESETS

    torch.set_num_threads(1)
    base = PRESETS[PRESET]
    PRESETS[variant_preset(streams)] = replace(base, model=replace(base.model, streams=streams))
    times = timing_steps(loop)
    budget = steps or MAX_STEPS
    start = time.perf_counter()
    bits = priors.train(priors.PriorTrainConfig(
        codes=codes, level="bottom", out=str(run_dir), preset=variant_preset(streams), steps=budget,
        max_minutes=minutes, eval_every=budget, checkpoint_every=budget, seed=seed, n_samples=0))
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(run_dir) / LOG_FILE).read_text().splitlines()]
    if len(times) != records[-1]["step"] + 1:
        raise RuntimeError(f"timed {len(times) - 1} of {records[-1]['step']} steps: the loop no longer calls "
                           "pipelines.train.loop.train_step")
    print(json.dumps({"streams": streams, "seed": seed, "steps": records[-1]["step"], "seconds": seconds,
                      "train_seconds": times[-1] - times[0], "step_times": times,
                      "train_bits": records[-1]["train_bits"], "validation_bits": bits}))


def worker_command(run_dir, streams, seed, codes, minutes, steps):
    arguments = dict(run_dir=str(run_dir), streams=streams, seed=seed, codes=codes, minutes=minutes, steps=steps)
    return [sys.executable, "-m", "bench.streams", json.dumps(arguments)]


def train_side_by_side(work, seed, codes, minutes, steps):
    """Both variants of a seed, at the same time -> their runs (one, two), and their step-time
    ratio two / one while both trained."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    finished = run_together([worker_command(work / f"{streams}-{seed}", streams, seed, codes, minutes, steps)
                             for streams in VARIANTS], env=env)
    runs = [json.loads(result.stdout.strip().splitlines()[-1]) for result in finished]
    return runs, step_time_ratio(runs)


def step_time_ratio(runs):
    """Sets each run's seconds per step and, over the time both runs were training, its side-by-side
    seconds per step (from the step times it came with, which it drops) -> the second run's over the
    first's (None when one of them finished fewer than two steps in that time)."""
    start, end = max(run["step_times"][0] for run in runs), min(run["step_times"][-1] for run in runs)
    for run in runs:
        run["seconds_per_step"] = run["train_seconds"] / run["steps"]
        ends = [t for t in run.pop("step_times")[1:] if start <= t <= end]  # steps that ended while both trained
        run["side_by_side_seconds_per_step"] = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None
    first, second = (run["side_by_side_seconds_per_step"] for run in runs)
    return second / first if first and second else None


def parameters(streams):
    from prior import PixelSNAIL, get_preset

    return PixelSNAIL(get_preset(PRESET, streams=streams).model).num_parameters()


def run(args):
    """Trains cpu-bottom with one and with two streams on --codes, the two at the same time (one
    thread each), for --seeds seeds, every run for --minutes of wall time (the default) or for
    --steps steps; compares their validation bits per code and their step times. Writes
    streams.json and streams.md (--minutes) or streams-steps.json and streams-steps.md (--steps)
    to --out."""
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    if args.minutes is None and args.steps is None:
        args.minutes = defaults["minutes"]
    args.seeds = args.seeds or defaults["seeds"]
    args.codes = args.codes or FULL_DEFAULTS["codes"]
    if not Path(args.codes).exists():
        raise SystemExit(f"error: no code database at {args.codes}: run `make demo` or pass --codes")
    info = machine_info()
    budget = f"{args.minutes} min" if args.steps is None else f"{args.steps} steps"
    runs, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            log(f"seed {seed}: {PRESET} with one and with two streams, {budget} each, side by side")
            seed_runs, ratio = train_side_by_side(Path(tmp), seed, str(Path(args.codes).absolute()), args.minutes,
                                                  args.steps)
            runs.extend(seed_runs)
            ratios.append(ratio)
            log("  " + ", ".join(f"{r['streams']} stream(s): {r['steps']} steps, {r['seconds_per_step']:.3f} s/step, "
                                 f"validation {r['validation_bits']:.4f} bits/code" for r in seed_runs))
    results = {
        "benchmark": "streams",
        **info,
        "threads": 1,
        "load_average_after": load_average(),
        "config": {"preset": PRESET, "codes": recorded_path(args.codes),
                   "budget": "equal wall time" if args.steps is None else "equal steps", "minutes": args.minutes,
                   "steps": args.steps, "seeds": args.seeds,
                   "parameters": {streams: parameters(streams) for streams in VARIANTS}},
        "runs": runs,
        "two_minus_one": two_minus_one(runs),
        "step_time_ratio": ratios,
    }
    (REPORT if args.steps is None else STEPS_REPORT).publish(results, args.out)


def two_minus_one(runs):
    """Validation bits per code, two streams minus one stream, per seed."""
    bits = {(r["streams"], r["seed"]): r["validation_bits"] for r in runs}
    return [bits["two", seed] - bits["one", seed] for seed in sorted({r["seed"] for r in runs})]


def add_arguments(parser):
    full, quick = FULL_DEFAULTS, QUICK_DEFAULTS
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run in seconds: minutes={quick['minutes']} (unless --steps), seeds={quick['seeds']}")
    parser.add_argument("--codes", help=f"the code database (default {recorded_path(full['codes'])}, what `make demo` "
                                        "writes)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float,
                        help=f"equal wall time: every run trains this long (the default, {full['minutes']})")
    budget.add_argument("--steps", type=int, help="equal steps: every run trains exactly this many steps, no time "
                                                  "budget (results in streams-steps.json and .md)")
    parser.add_argument("--seeds", type=int, help=f"seeds 0, 1, ... (default {full['seeds']})")
    add_out_argument(parser, "streams.json and streams.md, or streams-steps.json and .md")


# -- output -----------------------------------------------------------------------------------


HEADER = ("streams", "seed", "steps", "s/step", "final training loss (bits/code)", "validation bits/code (EMA)")


def seconds_per_step(run):
    """The training loop's seconds per step (results from before the steps were timed: the whole
    run's seconds, its start and final evaluation included)."""
    return run.get("seconds_per_step", run["seconds"] / run["steps"])


def streams_rows(results):
    return [(r["streams"], str(r["seed"]), str(r["steps"]), f"{seconds_per_step(r):.3f}", f"{r['train_bits']:.4f}",
             f"{r['validation_bits']:.4f}") for r in results["runs"]]


def mean_bits(results, streams):
    return statistics.mean(r["validation_bits"] for r in results["runs"] if r["streams"] == streams)


def budget_text(config):
    if config.get("steps") is None:
        return f"{config['minutes']} min of wall time per run"
    return f"{config['steps']} steps per run, no time budget"


def step_time_lines(results):
    """The step-time ratio of each seed, where the results hold it."""
    if "step_time_ratio" not in results:
        return []
    ratios = [f"{ratio:.2f}" if ratio else "n/a" for ratio in results["step_time_ratio"]]
    measured = [ratio for ratio in results["step_time_ratio"] if ratio]
    mean = f" (mean {statistics.mean(measured):.2f})" if measured else ""
    return [f"step time, two streams / one stream, side by side (over the time both trained), per seed: "
            f"{', '.join(ratios)}{mean}; s/step: the training loop's seconds (every step as the trainer runs it) "
            "over its steps"]


def summary_lines(results):
    c, gaps = results["config"], results["two_minus_one"]
    return [
        f"{c['preset']} on {c['codes']}, {budget_text(c)}, seeds 0..{c['seeds'] - 1}; the two "
        "variants of a seed ran at the same time, one thread each; parameters: one stream "
        f"{c['parameters']['one']:,}, two streams {c['parameters']['two']:,}",
        f"validation bits/code, mean over seeds: one stream {mean_bits(results, 'one'):.4f}, two streams "
        f"{mean_bits(results, 'two'):.4f}; two minus one per seed: {', '.join(f'{g:+.4f}' for g in gaps)} "
        f"(mean {statistics.mean(gaps):+.4f}; two streams lower in {sum(g < 0 for g in gaps)} of {len(gaps)} seeds)",
        *step_time_lines(results),
        "validation: the trainer's final evaluation of the EMA weights over the whole held-out split, in the "
        "trainer's precision (--precision auto)",
        *machine_lines(results),
    ]


def table(results):
    return HEADER, streams_rows(results), summary_lines(results)


TITLE = "Streams benchmark: cpu-bottom with one and with two streams at equal"
REPORT = Report("streams", f"{TITLE} wall time", table)
STEPS_REPORT = Report("streams-steps", f"{TITLE} steps", table)


if __name__ == "__main__":
    train_variant(**json.loads(sys.argv[1]))
