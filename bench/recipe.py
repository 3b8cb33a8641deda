"""The `recipe` benchmark: a pixel preset's Polyak average and learning rate, chosen at the length
of run users run and confirmed on photos the choice never saw.

Each variant (Polyak decay, learning rate) is one run of the real trainer (scripts/train_pixelsnail.py)
from the same seed on the same data. Every variant costs the same per step, so the runs go to fixed
step counts (--marks; the trainer is deterministic) and equal steps are equal time. A run is stopped
and scored at each mark and resumed to the next (exact resume: one run), in fp32 with its averaged
weights: on the held-out crops (the built-in test split), which the choice is made on, and on crops
of other photos (default matplotlib's grace_hopper.jpg), which confirm it or not. --grey-photos
trains and scores every variant on other data altogether: crops of scikit-image's greyscale photos
(as RGB), some photos for training and others held out, written as an image folder.
"""

import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import (GREY_DATA, GREY_PHOTOS, OTHER_CROPS, Report, add_out_argument, default_other_photos, log,
                          machine_info, machine_lines, photo_crops, recorded_path, results_record, run_bits,
                          train_pixel_run, write_grey_folder, write_pngs)
from pipelines.cli import user_path
from prior import get_preset

FULL_MARKS = (1000, 1400)  # the trainer's default steps; about the 10 minutes of make demo-pixels on 2 cores
QUICK_MARKS = (10, 20)
VARIANTS = ("0.98:4e-3", "0.995:2e-3", "0.995:4e-3", "0.998:2e-3")


def variant(text):
    """'POLYAK:LR' -> (polyak, lr), e.g. '0.995:2e-3'."""
    polyak, _, lr = text.partition(":")
    try:
        return float(polyak), float(lr)
    except ValueError:
        raise ValueError(f"--variants takes POLYAK:LR pairs such as 0.995:2e-3, not {text!r}") from None


def variant_curve(work, args, polyak, lr, seed, other_folder):
    """[{steps, session_seconds, held_out, other}] of one run of the variant, scored at each mark."""
    run_dir, curve = work / f"run-{polyak:g}-{lr:g}-{seed}", []
    for mark in args.marks:
        log(f"Polyak {polyak:g}, lr {lr:g}, seed {seed}: training to step {mark}")
        start = time.perf_counter()
        train_pixel_run(run_dir, "--data", args.train_data, "--seed", str(seed), "--preset", args.preset,
                        "--ema-decay", repr(polyak), "--lr", repr(lr), "--steps", str(mark), resume=bool(curve))
        seconds = time.perf_counter() - start
        held_out, other = run_bits(run_dir, args.eval_data, other_folder, work)
        curve.append({"steps": mark, "session_seconds": seconds, "held_out": held_out, "other": other})
        log(f"  step {mark}: held-out {held_out:.4f}, other photos {other:.4f} bits/dim")
    return curve


def run(args):
    """Trains the preset once per variant and seed to each mark and scores it there; writes
    recipe.json and recipe.md to --out.

    python -m bench recipe                    # four variants to 1,400 steps, about 50 minutes on 2 idle cores
    python -m bench recipe --variants 0.98:4e-3 0.995:2e-3 --seeds 1 --add   # another seed of two of them
    python -m bench recipe --grey-photos --variants 0.98:4e-3 0.995:2e-3   # two of them on other data
    python -m bench recipe --quick            # smoke run, the tiny preset, a minute
    """
    args.preset = args.preset or ("tiny" if args.quick else "cpu-small")
    args.marks = sorted(args.marks or (QUICK_MARKS if args.quick else FULL_MARKS))
    preset = get_preset(args.preset)
    size = preset.model.shape[0]
    other_photos = args.other_photos or default_other_photos()
    train_data, eval_data = (GREY_DATA, GREY_DATA) if args.grey_photos else (args.train_data, args.eval_data)
    config = {"preset": args.preset, "preset_default": [preset.ema_decay, preset.lr], "marks": args.marks,
              "train_data": recorded_path(train_data), "eval_data": recorded_path(eval_data),
              "other_photos": [Path(p).name for p in other_photos], "n_other": 20 if args.quick else OTHER_CROPS}
    report = GREY_REPORT if args.grey_photos else REPORT
    earlier = earlier_runs(Path(args.out) / f"{report.name}.json", config) if args.add else []
    info = machine_info()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_pngs(photo_crops(other_photos, config["n_other"], size), work / "other")
        if args.grey_photos:
            args.train_data = args.eval_data = str(write_grey_folder(work / "grey", size, 40 if args.quick else None))
        for seed in args.seeds:
            for polyak, lr in args.variants:
                curve = variant_curve(work, args, polyak, lr, seed, work / "other")
                runs.append({"polyak": polyak, "lr": lr, "seed": seed, "date": info["date"], "curve": curve})
    added = {(r["polyak"], r["lr"], r["seed"]) for r in runs}
    runs = [r for r in earlier if (r["polyak"], r["lr"], r["seed"]) not in added] + runs
    report.publish(results_record(report.name, info, args.quick, config, runs=runs), args.out)


def earlier_runs(path, config):
    """The runs of the recipe.json that --add adds to; refused unless it measured the same thing."""
    if not path.is_file():
        raise ValueError(f"--add: no {path} to add to")
    results = json.loads(path.read_text())
    if results["config"] != config:
        raise ValueError(f"--add: {path} was made with other settings ({results['config']}); run without --add")
    return results["runs"]


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help=f"the tiny preset to steps {QUICK_MARKS}: a smoke run")
    parser.add_argument("--preset", help="the pixel preset whose recipe is measured (default cpu-small)")
    parser.add_argument("--variants", type=variant, nargs="+", default=[variant(v) for v in VARIANTS],
                        metavar="POLYAK:LR", help=f"Polyak decay and learning rate pairs (default: {' '.join(VARIANTS)})")
    parser.add_argument("--marks", type=int, nargs="+",
                        help=f"the step counts each run is scored at (default {' '.join(map(str, FULL_MARKS))})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per variant and seed (default 0)")
    parser.add_argument("--add", action="store_true",
                        help="add these runs to the recipe.json in --out (same preset, marks and data), replacing "
                             "runs of the same variant and seed")
    parser.add_argument("--grey-photos", action="store_true",
                        help="train and score on crops of scikit-image's greyscale photos instead (train: "
                             f"{', '.join(GREY_PHOTOS['train'])}; held out: {', '.join(GREY_PHOTOS['test'])}); "
                             "writes recipe-grey.json and .md")
    parser.add_argument("--train-data", default="builtin", help="the training data, as the trainer takes it")
    parser.add_argument("--eval-data", default="builtin",
                        help="whose test split is the held-out set the choice is made on (default builtin)")
    parser.add_argument("--other-photos", nargs="+", metavar="PHOTO", type=user_path,
                        help="photos to cut the confirming crops from (default: matplotlib's grace_hopper.jpg)")
    add_out_argument(parser, "recipe.json and recipe.md (recipe-grey.* with --grey-photos)")


# -- output -----------------------------------------------------------------------------------


def mean_by_variant(results, mark, key):
    """{(polyak, lr): mean of `key` at step `mark` over the variant's seeds}."""
    values = {}
    for r in results["runs"]:
        point = next(p for p in r["curve"] if p["steps"] == mark)
        values.setdefault((r["polyak"], r["lr"]), []).append(point[key])
    return {v: statistics.fmean(bits) for v, bits in values.items()}


def table(results):
    c = results["config"]
    default = tuple(c["preset_default"])
    header = ("Polyak", "lr", "seed", "steps", "train s", "held-out bits/dim", "other photos bits/dim")
    rows = [(f"{r['polyak']:g}" + (" (preset)" if (r["polyak"], r["lr"]) == default else ""), f"{r['lr']:g}",
             str(r["seed"]), str(p["steps"]), f"{p['session_seconds']:.0f}", f"{p['held_out']:.4f}",
             f"{p['other']:.4f}") for r in results["runs"] for p in r["curve"]]
    grey = c["train_data"] == GREY_DATA
    data = (f"crops of scikit-image's greyscale photos as RGB ({', '.join(GREY_PHOTOS['train'])}); held-out: crops "
            f"of {', '.join(GREY_PHOTOS['test'])}" if grey else
            f"{c['train_data']}; held-out: the test split of {c['eval_data']} (the choice is made on it)")
    role = "out of the training data's kind, shown for completeness" if grey else "the confirmation"
    notes = [f"{c['preset']} trained on {data}; other photos: {c['n_other']} crops of {', '.join(c['other_photos'])} "
             f"({role}); exact bits/dim in fp32 with the averaged weights; train s: that session of the trainer, "
             "start-up included"]
    for mark in c["marks"]:
        held_out, other = (mean_by_variant(results, mark, key) for key in ("held_out", "other"))
        ranked = sorted(held_out, key=held_out.get)
        best, best_other = ranked[0], min(other, key=other.get)
        notes.append(f"step {mark}, by mean held-out bits/dim: " + ", ".join(
            f"{p:g} / {lr:g}: {held_out[(p, lr)]:.4f} (other {other[(p, lr)]:.4f})" for p, lr in ranked)
            + f"; best on held-out {best[0]:g} / {best[1]:g}, "
            + ("also best on the other photos" if best == best_other else
               f"but {best_other[0]:g} / {best_other[1]:g} is best on the other photos"))
    return header, rows, notes + machine_lines(results)


REPORT = Report("recipe", "The Polyak average and learning rate of a pixel preset at the length users run it", table,
                quick="the tiny preset for a few steps")
GREY_REPORT = Report("recipe-grey", "The Polyak average and learning rate of a pixel preset, checked on other data",
                     table, quick="the tiny preset for a few steps")
