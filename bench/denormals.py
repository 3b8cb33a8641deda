"""The `denormals` benchmark: what computing denormal floats as zero gains on the CPU.

As a pixel model grows confident, the far tails of its likelihood (and their gradients) fall below
fp32's normal range, where the CPU computes many times slower. The trainers flush them to zero
(pipelines.device); the codec refuses to, since a file decodes only under the floats it was coded
with. One cpu-small run on crops of scikit-image's greyscale photos (where the model grows confident
fastest) is trained to --young steps, copied, and trained on to --steps. Then, alternating, --reps
times:
- train: copies of the confident run resumed for --more steps by the training script as it is
  (flushing) and with the flush taken out; the losses must agree;
- codec: scripts/compress.py coding a held-out greyscale photo whole with the young and the confident
  model, as it ships and flushing (its refusal taken out): what flushing would gain it, and whether
  its files would change.
Each figure is a whole process's seconds, start-up included.
"""

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (GREY_PHOTOS, Report, add_out_argument, add_quick_argument, apply_defaults, grey_photo, log,
                          machine_info, machine_lines, results_record, run_command, train_pixel_run, write_grey_folder)
from prior import get_preset

# how a child process runs a script: a variant set up first, then the script as __main__
RUN_SCRIPT = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
TRAINER_WITHOUT_FLUSH = ("import contextlib, pipelines.device as d, pipelines.train.loop as loop; "
                         "assert loop.flush_denormals and d.flush_denormals_in_thread_pool; "
                         "loop.flush_denormals = contextlib.nullcontext; d.flush_denormals_in_thread_pool = lambda: None; ")
CODEC_FLUSHING = ("import torch, pipelines.infer.codec as c; assert c.check_denormals_kept; "
                  "c.check_denormals_kept = lambda what: None; torch.set_flush_denormal(True); ")
PHOTO = GREY_PHOTOS["test"][0]  # the codec's photo: held out from the training crops
QUICK = {"preset": "tiny", "young": 5, "steps": 20, "more": 5, "reps": 1, "photo_side": 32, "crops": 40}
FULL = {"preset": "cpu-small", "young": 100, "steps": 1000, "more": 100, "reps": 2, "photo_side": None, "crops": None}
OPTIONS = ("young", "steps", "more", "reps")  # the settings the command line may change


def timed_script(prelude, *args):
    """Seconds of `python -c PRELUDE+RUN_SCRIPT ARGS` (a script and its options) from start to exit."""
    start = time.perf_counter()
    run_command([sys.executable, "-c", prelude + RUN_SCRIPT, *args])
    return time.perf_counter() - start


def train_case(work, base, settings, flush, rep):
    """A copy of `base` resumed for settings['more'] steps, with or without the trainer's flush."""
    run_dir = work / f"train-{flush}-{rep}"
    shutil.copytree(base, run_dir)
    seconds = timed_script("" if flush else TRAINER_WITHOUT_FLUSH, "scripts/train_pixelsnail.py", "--out", run_dir,
                           "--resume", "--data", work / "grey", "--steps", settings["steps"] + settings["more"],
                           "--n-samples", 0, "--eval-every", 10**9, "--checkpoint-every", 10**9)
    final = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    shutil.rmtree(run_dir)
    return {"arm": "train", "model": "confident", "flush": flush, "rep": rep, "seconds": seconds,
            "train_bits": final["train_bits"], "test_bits": final["test_bits"]}


def codec_case(work, model, run_dir, flush, rep):
    """compress.py coding the photo with `run_dir`'s model, as it ships (denormals kept) or flushing them
    on every thread from the process's start, its refusal to code so taken out."""
    out = work / f"codec-{model}-{flush}-{rep}"
    seconds = timed_script(CODEC_FLUSHING if flush else "", "scripts/compress.py", "--ckpt", run_dir, "--out", out,
                           work / "photo.png")
    coded = b"".join(path.read_bytes() for path in sorted(out.iterdir()))
    shutil.rmtree(out)
    return {"arm": "codec", "model": model, "flush": flush, "rep": rep, "seconds": seconds, "bytes": len(coded),
            "sha256": hashlib.sha256(coded).hexdigest()}


def prepare(work, settings, seed):
    """The grey crops, the photo, and the run at --young steps and at --steps -> (young, confident) run dirs."""
    write_grey_folder(work / "grey", get_preset(settings["preset"]).model.shape[0], settings["crops"])
    photo = grey_photo(PHOTO)
    if settings["photo_side"]:
        photo = photo.crop((0, 0, settings["photo_side"], settings["photo_side"]))
    photo.save(work / "photo.png")
    young, confident = work / "young", work / "confident"
    options = ("--data", str(work / "grey"), "--seed", str(seed), "--preset", settings["preset"])
    log(f"training {settings['preset']} on the grey crops to step {settings['young']}, then {settings['steps']}")
    train_pixel_run(confident, *options, "--steps", str(settings["young"]))
    shutil.copytree(confident, young)
    train_pixel_run(confident, *options, "--steps", str(settings["steps"]), resume=True)
    return young, confident


def run(args):
    """Trains one run, then times the trainer with and without the flush and the codec with the flag
    off and on, alternating; writes denormals.json and denormals.md to --out.

    python -m bench denormals           # cpu-small to 1,000 steps, then 2 x (2 trainings + 4 codings): ~25 minutes
    python -m bench denormals --quick   # smoke run, the tiny preset, a minute
    """
    defaults = QUICK if args.quick else FULL
    apply_defaults(args, {key: defaults[key] for key in OPTIONS})
    settings = {**defaults, **{key: getattr(args, key) for key in OPTIONS}}
    if not 1 <= settings["young"] < settings["steps"] or min(settings["more"], settings["reps"]) < 1:
        raise ValueError("--young, --steps, --more and --reps need 1 <= young < steps, more >= 1, reps >= 1, not "
                         + ", ".join(f"{key} {settings[key]}" for key in OPTIONS))
    info = machine_info()
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        young, confident = prepare(work, settings, args.seed)
        for rep in range(1, settings["reps"] + 1):
            for flush in (False, True):
                cases.append(train_case(work, confident, settings, flush, rep))
                log(f"train, flush {flush}, rep {rep}: {cases[-1]['seconds']:.1f} s")
                for model, run_dir in (("young", young), ("confident", confident)):
                    cases.append(codec_case(work, model, run_dir, flush, rep))
                    log(f"codec, {model} model, flag {flush}, rep {rep}: {cases[-1]['seconds']:.1f} s")
    config = {**settings, "photo": PHOTO, "data": f"crops of {', '.join(GREY_PHOTOS['train'])}", "seed": args.seed}
    REPORT.publish(results_record("denormals", info, args.quick, config, cases=cases), args.out)


def add_arguments(parser):
    add_quick_argument(parser, QUICK)
    parser.add_argument("--steps", type=int, help=f"the confident model's steps (default {FULL['steps']})")
    parser.add_argument("--young", type=int, help=f"the young model's steps (default {FULL['young']})")
    parser.add_argument("--more", type=int, help=f"steps each timed training resumes for (default {FULL['more']})")
    parser.add_argument("--reps", type=int, help=f"alternations of off and on (default {FULL['reps']})")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    add_out_argument(parser, "denormals.json and denormals.md")


# -- output -----------------------------------------------------------------------------------


def total(cases, arm, model, flush):
    return sum(c["seconds"] for c in cases if (c["arm"], c["model"], c["flush"]) == (arm, model, flush))


def differing(cases, arm, key):
    """The models (in the order of the cases) whose cases of `arm` did not all give the same `key`."""
    models = dict.fromkeys(c["model"] for c in cases if c["arm"] == arm)
    return [model for model in models if len({c[key] for c in cases if (c["arm"], c["model"]) == (arm, model)}) > 1]


def table(results):
    c, cases = results["config"], results["cases"]
    header = ("what", "model", "denormals", "rep", "seconds", "result")
    rows = [(case["arm"], case["model"], "flushed" if case["flush"] else "kept", str(case["rep"]),
             f"{case['seconds']:.1f}",
             f"train bits {case['train_bits']:.6f}, test bits/dim {case['test_bits']:.6f}" if case["arm"] == "train"
             else f"{case['bytes']:,} bytes") for case in cases]
    train = total(cases, "train", "confident", False) / total(cases, "train", "confident", True)
    notes = [
        f"{c['preset']} (seed {c['seed']}) trained on {c['data']} to step {c['young']} (young) and {c['steps']} "
        f"(confident); train: that run resumed for {c['more']} steps and evaluated; codec: compress.py on {c['photo']} "
        f"({'a crop of it' if c['photo_side'] else 'whole'}); seconds: the whole process",
        f"train: flushed {train:.2f}x faster than kept over {c['reps']} rep(s); the losses "
        + ("differ" if differing(cases, "train", "train_bits") or differing(cases, "train", "test_bits")
           else "agree to every digit"),
    ]
    for model in ("young", "confident"):
        speedup = total(cases, "codec", model, False) / total(cases, "codec", model, True)
        notes.append(f"codec, {model} model: flushed {speedup:.2f}x faster than kept")
    for flush in (False, True):
        ratio = total(cases, "codec", "confident", flush) / total(cases, "codec", "young", flush)
        notes.append(f"codec with denormals {'flushed' if flush else 'kept'}: the confident model takes "
                     f"{ratio:.2f}x the young one's time")
    changed = differing(cases, "codec", "sha256")
    notes.append("flushing changes the files of the " + " and the ".join(changed) + " model" if changed else
                 "flushing changes no file")
    return header, rows, notes + machine_lines(results)


REPORT = Report("denormals", "Denormal floats flushed to zero: the trainer and the codec, kept against flushed", table,
                quick="the tiny preset for a few steps on small crops")
