"""The `streams` benchmark: does the vertical stream help an attention-free prior?

The real prior trainer (`pipelines.train.priors.train`) trains the `cpu-bottom` preset with one
stream (the model as it was before the vertical stream: it never sees the codes up and to the
right beyond its kernel) and with two streams, for the same wall time, on a code database (the
demo's), for several seeds. The two variants of a seed train at the same time, as two processes
of one thread each, so that the machine's load hits both alike. Each run ends as the trainer
ends a run out of time: the EMA weights evaluated on the whole held-out split (every 20th
record), in validation bits per code.

Run as `python -m bench.streams RUN_DIR STREAMS SEED MINUTES CODES` it is one of those workers.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import (ROOT, Report, add_quick_argument, apply_defaults, load_average, log, machine_info,
                          machine_lines)
from pipelines.store.run_files import LOG_FILE

PRESET = "cpu-bottom"
VARIANTS = ("one", "two")  # the model's `streams`
FULL_DEFAULTS = dict(minutes=4.0, seeds=3, codes=str(ROOT / "runs" / "demo" / "codes.lmdb"))
QUICK_DEFAULTS = dict(minutes=0.05, seeds=1)
STEPS = 100_000  # more than any run reaches: the time budget ends every run


def variant_preset(streams):
    return f"{PRESET}-{streams}"


def train_variant(run_dir, streams, seed, minutes, codes):
    """In a worker process of one thread: registers the variant as a preset (the trainer takes
    presets by name) and trains it; prints one JSON line with the result."""
    import torch

    from pipelines.train import priors
    from prior.presets import PRESETS

    torch.set_num_threads(1)
    base = PRESETS[PRESET]
    PRESETS[variant_preset(streams)] = replace(base, model=replace(base.model, streams=streams))
    start = time.perf_counter()
    bits = priors.train(priors.PriorTrainConfig(
        codes=codes, level="bottom", out=str(run_dir), preset=variant_preset(streams), steps=STEPS,
        max_minutes=minutes, eval_every=STEPS, checkpoint_every=STEPS, seed=seed, n_samples=0))
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(run_dir) / LOG_FILE).read_text().splitlines()]
    print(json.dumps({"streams": streams, "seed": seed, "steps": records[-1]["step"], "seconds": seconds,
                      "train_bits": records[-1]["train_bits"], "validation_bits": bits}))


def start_worker(run_dir, streams, seed, minutes, codes):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bench.streams", str(run_dir), streams, str(seed), repr(minutes), codes]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(worker):
    stdout, stderr = worker.communicate()
    if worker.returncode:
        raise RuntimeError(f"{' '.join(worker.args)} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def parameters(streams):
    from prior import PixelSNAIL, get_preset

    return PixelSNAIL(get_preset(PRESET, streams=streams).model).num_parameters()


def run(args):
    """Trains cpu-bottom with one and with two streams on --codes for --minutes each, the two
    at the same time (one thread each), for --seeds seeds; compares their validation bits per
    code. Writes streams.json and streams.md to --out."""
    apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    if not Path(args.codes).exists():
        raise SystemExit(f"error: no code database at {args.codes}: run `make demo` or pass --codes")
    info = machine_info()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            log(f"seed {seed}: {PRESET} with one and with two streams, {args.minutes} min each, side by side")
            workers = [start_worker(Path(tmp) / f"{streams}-{seed}", streams, seed, args.minutes, args.codes)
                       for streams in VARIANTS]
            runs.extend(result_of(worker) for worker in workers)
    results = {
        "benchmark": "streams",
        **info,
        "threads": 1,
        "load_average_after": load_average(),
        "config": {"preset": PRESET, "codes": args.codes, "minutes": args.minutes, "seeds": args.seeds,
                   "parameters": {streams: parameters(streams) for streams in VARIANTS}},
        "runs": runs,
        "two_minus_one": two_minus_one(runs),
    }
    REPORT.publish(results, args.out)


def two_minus_one(runs):
    """Validation bits per code, two streams minus one stream, per seed."""
    bits = {(r["streams"], r["seed"]): r["validation_bits"] for r in runs}
    return [bits["two", seed] - bits["one", seed] for seed in sorted({r["seed"] for r in runs})]


def add_arguments(parser):
    full = FULL_DEFAULTS
    add_quick_argument(parser, QUICK_DEFAULTS)
    parser.add_argument("--codes", help=f"the code database (default {full['codes']}, what `make demo` writes)")
    parser.add_argument("--minutes", type=float, help=f"wall time of every run (default {full['minutes']})")
    parser.add_argument("--seeds", type=int, help=f"seeds 0, 1, ... (default {full['seeds']})")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"),
                        help="directory for streams.json and streams.md (default bench/results)")


# -- output -----------------------------------------------------------------------------------


HEADER = ("streams", "seed", "steps", "s/step", "final training loss (bits/code)", "validation bits/code (EMA)")


def streams_rows(results):
    return [(r["streams"], str(r["seed"]), str(r["steps"]), f"{r['seconds'] / r['steps']:.3f}",
             f"{r['train_bits']:.4f}", f"{r['validation_bits']:.4f}") for r in results["runs"]]


def mean_bits(results, streams):
    return statistics.mean(r["validation_bits"] for r in results["runs"] if r["streams"] == streams)


def summary_lines(results):
    c, gaps = results["config"], results["two_minus_one"]
    return [
        f"{c['preset']} on {c['codes']}, {c['minutes']} min of wall time per run, seeds 0..{c['seeds'] - 1}; the two "
        "variants of a seed ran at the same time, one thread each; parameters: one stream "
        f"{c['parameters']['one']:,}, two streams {c['parameters']['two']:,}",
        f"validation bits/code, mean over seeds: one stream {mean_bits(results, 'one'):.4f}, two streams "
        f"{mean_bits(results, 'two'):.4f}; two minus one per seed: {', '.join(f'{g:+.4f}' for g in gaps)} "
        f"(mean {statistics.mean(gaps):+.4f}; two streams lower in {sum(g < 0 for g in gaps)} of {len(gaps)} seeds)",
        "validation: the trainer's final evaluation of the EMA weights over the whole held-out split, in the "
        "trainer's precision (--precision auto)",
        *machine_lines(results),
    ]


REPORT = Report("streams", "Streams benchmark: cpu-bottom with one and with two streams at equal wall time",
                lambda results: (HEADER, streams_rows(results), summary_lines(results)))


if __name__ == "__main__":
    run_dir, streams, seed, minutes, codes = sys.argv[1:]
    train_variant(run_dir, streams, int(seed), float(minutes), codes)
