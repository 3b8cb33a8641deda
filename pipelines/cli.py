"""What the command-line scripts share: user errors become one line, not a traceback."""

import argparse
import sys

from pipelines.training import Stopped


def run(main):
    """Calls main(); a user error (bad path, bad file, bad value), a full disk or a NaN loss exits 2
    with one line on stderr; a training stopped by SIGINT / SIGTERM after saving exits 130 / 143,
    as does a second Ctrl-C (130) that stops at once."""
    try:
        main()
    except Stopped as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def one_line(error):
    """An error's message on one line.

    An exception raised in a DataLoader worker is raised again in the main process with the
    worker's whole traceback as its message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."); its last line, "module.DataError: <message>", holds the message.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows every option's default."""


def add_run_arguments(parser, defaults):
    """The options every trainer shares: budgets, precision, evaluation, checkpoints, resume."""
    p, d = parser, defaults
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps of the run")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="stop and save after this long")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm")
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
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader worker processes per process (default: none on CPU, whose cores the "
                   "model needs; up to 8 with a GPU)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")


def add_preset_overrides(parser):
    """Options whose default is the preset's: left out of the namespace unless given."""
    keep = argparse.SUPPRESS
    parser.add_argument("--batch-size", type=int, default=keep, help="per process (default: the preset's)")
    parser.add_argument("--lr", type=float, default=keep, help="initial learning rate (default: the preset's)")
    parser.add_argument("--dropout", type=float, default=keep, help="(default: the preset's)")
