"""The `precision` benchmark: does bf16 autocast train as well as fp32? The real trainer runs the
same short training in fp32 and in bf16 for three seeds; every final checkpoint is then evaluated
in fp32 over the whole test split.

Two runs of one seed drift apart from any difference at all (training is chaotic), so the bf16 -
fp32 gap is read against a control: a third fp32 run of the same seed whose learning rate is
0.1% higher, a change with no effect of its own worth measuring. Its gap from fp32 is the noise
that a paired comparison of this length cannot see through.
"""

import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import (Report, add_out_argument, add_quick_argument, apply_defaults, last_line_value, load_average,
                          log, machine_info, machine_lines, recorded_path, run_script)
from pipelines.store.run_files import LOG_FILE
from prior import get_preset

# name -> (precision, learning rate factor) of the runs made for every seed
RUNS = {"fp32": ("fp32", 1.0), "bf16": ("bf16", 1.0), "control": ("fp32", 1.001)}
SEEDS = (0, 1, 2)
QUICK_DEFAULTS = dict(preset="tiny", steps=20)
FULL_DEFAULTS = dict(preset="cpu-small", steps=400)


def last_train_bits(run_dir):
    """The trainer's smoothed training loss at its last step, from the run's log (log.jsonl)."""
    records = [json.loads(line) for line in (Path(run_dir) / LOG_FILE).read_text().splitlines()]
    return records[-1]["train_bits"]


def train_and_evaluate(run_dir, name, preset, data, steps, seed):
    """Trains one of RUNS with scripts/train_pixelsnail.py, evaluates its checkpoint in fp32;
    returns the numbers."""
    precision, lr_factor = RUNS[name]
    lr = get_preset(preset).lr * lr_factor
    start = time.perf_counter()
    output = run_script("scripts/train_pixelsnail.py", "--out", str(run_dir), "--preset", preset, "--data", data,
                        "--steps", str(steps), "--precision", precision, "--seed", str(seed), "--lr", repr(lr),
                        "--eval-every", str(steps), "--checkpoint-every", str(steps), "--n-samples", "0")
    train_seconds = time.perf_counter() - start
    trainer_bits = last_line_value(output, "test bits/dim: ")
    output = run_script("scripts/evaluate.py", "--ckpt", str(run_dir), "--data", data, "--precision", "fp32")
    return {
        "run": name,
        "precision": precision,
        "lr": lr,
        "seed": seed,
        "train_seconds": train_seconds,
        "train_bits": last_train_bits(run_dir),  # raw weights, the run's precision, smoothed over ~50 steps
        "test_bits_trainer": trainer_bits,  # the trainer's own final evaluation (fp32 over the whole split, as evaluate.py)
        "test_bits_fp32": last_line_value(output, "test bits/dim: "),
    }


def run(args):
    """Trains a preset for --steps steps with scripts/train_pixelsnail.py in fp32, in bf16
    autocast and in fp32 with a 0.1% higher learning rate (the control), for three seeds, on
    --data; evaluates every final (EMA) checkpoint in fp32 over the whole test split with
    scripts/evaluate.py. Reports, in the final training loss and in test bits/dim, the bf16 - fp32
    gap of each seed next to the control's gap. Writes precision.json and precision.md to --out."""
    apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    info = machine_info()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            for name in RUNS:
                log(f"training {args.preset} for {args.steps} steps, {name} run, seed {seed}")
                runs.append(train_and_evaluate(Path(tmp) / f"{name}-{seed}", name, args.preset, args.data,
                                               args.steps, seed))
    results = {
        "benchmark": "precision",
        **info,
        "load_average_after": load_average(),
        "config": {"preset": args.preset, "data": recorded_path(args.data), "steps": args.steps, "seeds": list(SEEDS)},
        "runs": runs,
        **{measure: compare(runs, measure) for measure in MEASURES},
    }
    REPORT.publish(results, args.out)


MEASURES = {"train_bits": "training loss (bits/dim)", "test_bits_fp32": "test bits/dim"}


def compare(runs, measure):
    """In one measure: the bf16 - fp32 and control - fp32 gaps of each seed, and the spread of
    fp32 between seeds."""
    value = {(r["run"], r["seed"]): r[measure] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    fp32 = [value["fp32", seed] for seed in seeds]
    return {"bf16_minus_fp32": [value["bf16", seed] - value["fp32", seed] for seed in seeds],
            "control_minus_fp32": [value["control", seed] - value["fp32", seed] for seed in seeds],
            "fp32_seed_range": max(fp32) - min(fp32)}


def add_arguments(parser):
    full = FULL_DEFAULTS
    add_quick_argument(parser, QUICK_DEFAULTS)
    parser.add_argument("--preset", help=f"the pixel preset to train (default {full['preset']})")
    parser.add_argument("--steps", type=int, help=f"training steps of each run (default {full['steps']})")
    parser.add_argument("--data", default="builtin", help="the dataset, as the trainer takes it")
    add_out_argument(parser, "precision.json and precision.md")


# -- output -----------------------------------------------------------------------------------


HEADER = ("run", "precision", "learning rate", "seed", "training s", "final training loss (bits/dim)",
          "test bits/dim (trainer, own precision)", "test bits/dim (fp32 eval)")


def precision_rows(results):
    return [(r["run"], r["precision"], f"{r['lr']:.6g}", str(r["seed"]), f"{r['train_seconds']:.1f}", f"{r['train_bits']:.4f}",
             f"{r['test_bits_trainer']:.4f}", f"{r['test_bits_fp32']:.4f}") for r in results["runs"]]


def gaps_text(gaps):
    return f"{', '.join(f'{g:+.4f}' for g in gaps)} (mean {statistics.mean(gaps):+.4f})"


def gap_line(name, comparison):
    """One measure's bf16 - fp32 gaps against the control's and the spread between seeds."""
    bf16, control = comparison["bf16_minus_fp32"], comparison["control_minus_fp32"]
    noise = max(abs(g) for g in control)
    verdict = "within" if abs(statistics.mean(bf16)) <= noise else "beyond"
    return (f"{name}, run - fp32 of the same seed: bf16 {gaps_text(bf16)}; control {gaps_text(control)}; "
            f"fp32 range over seeds {comparison['fp32_seed_range']:.4f}. The mean bf16 gap is {verdict} the "
            f"largest control gap ({noise:.4f})")


def summary_lines(results):
    c = results["config"]
    return [
        f"{c['preset']} preset, {c['steps']} steps on {c['data']}, seeds {c['seeds']}; the training loss is the "
        "trainer's own (running mean over ~50 steps, raw weights, the run's precision); every final (EMA) checkpoint "
        "is evaluated in fp32 over the whole test split",
        "control: fp32 with the learning rate 0.1% higher, the drift of two runs that differ in nothing worth "
        "measuring",
        *(gap_line(name, results[measure]) for measure, name in MEASURES.items()),
        *machine_lines(results),
    ]


REPORT = Report("precision", "Precision benchmark: bf16 autocast against fp32",
                lambda results: (HEADER, precision_rows(results), summary_lines(results)))
