"""The `codecs` benchmark: a density model's bits/dim is a compression rate, so the pixel model is
held against the lossless codecs a user knows, on the same held-out crops.

Two sets of crops, neither seen in training: the built-in test split (crops of the held-out photos)
and crops of other photos, by default matplotlib's sample photo of Grace Hopper, cut as the
built-in crops are cut (pipelines.data.datasets.random_crops); `--other-photos` takes the user's own.
The codecs: PNG at its maximum compression and WebP lossless at its best method (Pillow), as bits
per sub-pixel of the encoded files (headers included: a file is what a user stores). The model: one
run of the real trainer (scripts/train_pixelsnail.py, its defaults) per seed, stopped at each mark
by --max-minutes and resumed to the next with --resume (exact resume: one run, not several), and
scored in fp32 at each mark: the built-in crops by scripts/evaluate.py, the other crops by
scripts/score.py. Scoring time does not count as training time.
"""

import statistics
import tempfile
import time
from pathlib import Path

from bench.common import (OTHER_CROPS, Report, add_out_argument, default_other_photos, log, machine_info, machine_lines,
                          photo_crops, pyplot, recorded_path, results_record, run_bits, test_images, train_pixel_run,
                          write_pngs)
from pipelines.cli import user_path
from pipelines.eval.codecs import CODECS, codec_bits_per_subpixel
from pipelines.store.run_files import read_log
from prior import get_preset

FULL_MARKS = (2.0, 5.0, 10.0)
QUICK_MARKS = (0.1, 0.2)


def model_curve(work, args, marks, seed, other_folder):
    """[{minutes, steps, held_out, other}] of one training run stopped and scored at each mark."""
    run_dir, curve, done = work / f"run-{seed}", [], 0.0
    for mark in marks:
        log(f"seed {seed}: training to minute {mark:g}")
        start = time.perf_counter()
        train_pixel_run(run_dir, "--data", args.train_data, "--seed", str(seed),
                        *(["--preset", args.preset] if args.preset else []), "--steps", str(10**9),
                        "--max-minutes", repr(mark - done), resume=bool(done))
        seconds = time.perf_counter() - start
        done = mark
        held_out, other = run_bits(run_dir, args.eval_data, other_folder, work)
        steps = read_log(run_dir)[-1]["step"]
        curve.append({"minutes": mark, "steps": steps, "session_seconds": seconds, "held_out": held_out, "other": other})
        log(f"  minute {mark:g}, step {steps}: held-out {held_out:.4f}, other photos {other:.4f} bits/dim")
    return curve


def run(args):
    """Scores held-out crops with PNG and WebP lossless, then trains the pixel model with the
    trainer's defaults for 2, 5 and 10 minutes (one run per seed, scored at each mark) and puts its
    bits/dim beside them; writes codecs.json, codecs.md and codecs.png (bits/dim against training
    minutes) to --out.

    python -m bench codecs                    # about 15 minutes per seed on 2 idle cores
    python -m bench codecs --no-model         # the codecs alone, a minute
    python -m bench codecs --other-photos ~/photos   # the other crops from your photos
    """
    marks = QUICK_MARKS if args.quick else FULL_MARKS
    preset = args.preset or ("tiny" if args.quick else None)
    args.preset = preset
    size = get_preset(preset or "cpu-small").model.shape[0]  # the trainer takes the image size from the model
    other_photos = args.other_photos or default_other_photos()
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = {"held_out": test_images(args.eval_data, size),
                "other": photo_crops(other_photos, OTHER_CROPS if not args.quick else 20, size)}
        write_pngs(sets["other"], work / "other")
        codecs = {name: {key: codec_bits_per_subpixel(images, options) for key, images in sets.items()}
                  for name, options in CODECS.items()}
        for name, bits in codecs.items():
            log(f"{name}: {bits['held_out']:.3f} / {bits['other']:.3f} bits per sub-pixel (held-out / other crops)")
        runs = {} if args.no_model else {seed: model_curve(work, args, marks, seed, work / "other") for seed in args.seeds}
    config = {"preset": preset or "cpu-small (the trainer's default)", "train_data": recorded_path(args.train_data),
              "eval_data": recorded_path(args.eval_data), "other_photos": [Path(p).name for p in other_photos],
              "size": size, "n_images": {key: len(images) for key, images in sets.items()}, "marks": marks,
              "seeds": args.seeds}
    results = results_record("codecs", info, args.quick, config, codecs=codecs,
                             runs={str(seed): curve for seed, curve in runs.items()})
    REPORT.publish(results, args.out)
    if runs:
        plot(results, Path(args.out) / "codecs.png")


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="tiny preset, 6 and 12 seconds: a smoke run")
    parser.add_argument("--no-model", action="store_true", help="score the codecs only")
    parser.add_argument("--preset", help="the pixel preset to train (default: the trainer's, cpu-small)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run per seed (default 0)")
    parser.add_argument("--train-data", default="builtin", help="the training data, as the trainer takes it")
    parser.add_argument("--eval-data", default="builtin",
                        help="whose test split is the held-out set (default builtin: crops of held-out photos)")
    parser.add_argument("--other-photos", nargs="+", metavar="PHOTO", type=user_path,
                        help=f"photos to cut the other {OTHER_CROPS} crops from (default: matplotlib's sample photo "
                             "grace_hopper.jpg)")
    add_out_argument(parser, "codecs.json, codecs.md and codecs.png")


# -- output -----------------------------------------------------------------------------------


def mean_curve(results):
    """[(minutes, mean steps, mean held-out, mean other)] over the seeds' runs."""
    curves = list(results["runs"].values())
    return [(points[0]["minutes"], *(statistics.fmean(p[key] for p in points) for key in ("steps", "held_out", "other")))
            for points in zip(*curves)]


def table(results):
    c = results["config"]
    header = ("coder", f"held-out crops ({c['n_images']['held_out']})", f"other photos ({c['n_images']['other']})")
    rows = [(name, f"{bits['held_out']:.3f}", f"{bits['other']:.3f}") for name, bits in results["codecs"].items()]
    seeds = len(results["runs"])
    for minutes, steps, held_out, other in mean_curve(results) if seeds else []:
        rows.append((f"PixelSNAIL {c['preset'].split()[0]} after {minutes:g} min ({steps:.0f} steps)"
                     + (f", mean of {seeds} seeds" if seeds > 1 else ""), f"{held_out:.3f}", f"{other:.3f}"))
    notes = [
        f"held-out crops: the test split of {c['eval_data']} (builtin: crops of photos the model never trains on); "
        f"other photos: {c['n_images']['other']} crops of {', '.join(c['other_photos'])}, cut as the built-in crops are",
        "codecs: the encoded files' bytes x 8 / sub-pixels, headers included; model: exact bits/dim in fp32 (EMA "
        "weights), the code length of an ideal entropy coder driven by the model",
    ]
    if seeds:
        notes.append(f"model: the trainer's defaults, {c['train_data']} training data, one run per seed stopped and "
                     f"scored at {', '.join(f'{m:g}' for m in c['marks'])} minutes")
    for seed, curve in results["runs"].items():
        notes.append(f"seed {seed}: " + "; ".join(f"{p['minutes']:g} min, step {p['steps']}: {p['held_out']:.4f} / "
                                                   f"{p['other']:.4f}" for p in curve))
    return header, rows, notes + machine_lines(results)


REPORT = Report("codecs", "Lossless codecs against the pixel model on crops of photos it never saw", table,
                quick="the tiny preset for seconds")


def plot(results, path):
    plt = pyplot()
    curve = mean_curve(results)
    figure, axes = plt.subplots(figsize=(6.4, 4))
    for column, (key, label, colour) in enumerate((("held_out", "held-out crops", "C0"), ("other", "other photos", "C1"))):
        axes.plot([p[0] for p in curve], [p[2 + column] for p in curve], "o-", color=colour,
                  label=f"PixelSNAIL, {label}")
        for (name, bits), style in zip(results["codecs"].items(), ("--", ":")):
            axes.axhline(bits[key], linestyle=style, color=colour, alpha=0.6, label=f"{name.split(' (')[0]}, {label}")
    axes.set_xlabel("training minutes (2 CPU cores)")
    axes.set_ylabel("bits per sub-pixel")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
