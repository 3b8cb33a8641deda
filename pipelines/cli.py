"""What the command-line scripts share: user errors become one line, not a traceback."""

import argparse
import os
import signal
import sys

from pipelines.errors import one_line
from pipelines.train.runtime import Stopped


def run(main, interrupted="interrupted"):
    """Calls main(); a user error (bad path, bad file, bad value), a full disk or a NaN loss exits 2
    with one line on stderr; a training stopped by SIGINT / SIGTERM after saving exits 130 / 143,
    as does a second Ctrl-C (130) that stops at once. Another Ctrl-C prints `interrupted` (the
    script says how to go on) and exits 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the scripts' start-up handler ends here
    try:
        main()
    except Stopped as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)


def user_path(text):
    """The argparse type of every path option: `~` and `~user` expanded, once, here (a shell leaves
    the `~` of `--out=~/x` as typed). Relative paths stay relative: a run resolves its data paths."""
    return os.path.expanduser(text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows every option's default."""


def trainer_parser(description, defaults, presets, out_help, out_required=False):
    """A trainer's parser with --out and every option the trainers share (`add_run_arguments`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=user_path, default=defaults.out, required=out_required, help=out_help)
    add_run_arguments(parser, defaults, presets)
    return parser


def add_image_data_setting(parser):
    add_run_setting(parser, "--data", type=user_path, help="'builtin' (crops of scikit-image's sample photos, the default), "
                    "a CIFAR-10 tarball/folder, an ImageNet 32x32 npz file/folder, or an image folder")


def add_run_arguments(parser, defaults, presets):
    """The options every trainer shares: the settings that define a run (left out of the namespace
    unless given: see pipelines.train.run_config), budgets, precision, evaluation, checkpoints, resume."""
    p, d = parser, defaults
    add_run_setting(p, "--preset", choices=list(presets), help="model and training settings")
    add_run_setting(p, "--batch-size", type=int, help="per process")
    add_run_setting(p, "--grad-accum", type=int, help="batches whose gradients make one optimizer step: an "
                    "optimizer step sees processes x batch size x grad accum examples (default 1)")
    add_run_setting(p, "--lr", type=float, help="initial learning rate")
    add_run_setting(p, "--grad-clip", type=float, help="max global gradient norm (default 1.0)")
    add_run_setting(p, "--seed", type=int, help="(default 0)")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps of the run")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="stop and save after this long")
    p.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast where the hardware has native bf16 (AMX, recent GPUs); "
                   "likelihoods and quantizers always compute in fp32")
    p.add_argument("--compile", action="store_true", default=d.compile,
                   help="torch.compile the model: compiles for a minute or more at the start, then "
                   "runs each step faster where it pays (see bench/results/train.md)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between test evaluations")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="test batches per periodic evaluation (the final one uses the whole split)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader worker processes per process (default: none on CPU, whose cores the "
                   "model needs; up to 8 with a GPU)")
    p.add_argument("--report-to", choices=["tensorboard"], default=d.report_to,
                   help="also log what log.jsonl logs with this accelerate tracker, into RUN_DIR/tensorboard")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out where it stopped, with its own run settings (its data may "
                   "be given a new path if it holds the same data)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in --out although it holds a model.safetensors without the state to "
                   "resume it (the model is replaced)")


RUN_SETTINGS_NOTE = ("[run setting]: an option that defines the run. A new run takes it from the preset (or the "
                     "default named); --resume takes it from the run and refuses another value.")


def add_run_setting(parser, flag, help, **options):
    """An option that defines the run: default the preset's (or the one named), on --resume the run's."""
    parser.epilog = RUN_SETTINGS_NOTE
    parser.add_argument(flag, default=argparse.SUPPRESS, help=f"{help} [run setting]", **options)


def add_pixelsnail_arguments(parser):
    """The run settings of PixelSNAIL trainers beyond the shared ones."""
    add_run_setting(parser, "--dropout", type=float, help="dropout probability")
    add_run_setting(parser, "--label-dropout", type=float, help="probability of replacing a label by a learned null "
                    "class (default 0), which classifier-free guidance (sample.py --guidance) needs")
    add_run_setting(parser, "--ema-decay", type=float, help="Polyak averaging of the weights, which evaluation, "
                    "samples and model.safetensors use; 0: none, the weights themselves")
