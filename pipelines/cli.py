"""What the command-line scripts share: user errors become one line, not a traceback, and one
grammar for their options: a config's options built from its fields (`add_config_options`, the
trainers' and the sampling controls of prior.drawing.Drawing), --label (`label_option`), and the
model a script runs, a pixel model or the VQ-VAE and its priors (`add_model_options`)."""

import argparse
import os
import signal
import sys
import typing
from dataclasses import fields, is_dataclass

from pipelines.errors import one_line
from pipelines.infer.generation import label_forms
from pipelines.train.run_config import CHOICES, COMMAND_LINE, HELP, PATH, REQUIRED, RUN_FIELD, field_metadata
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


def config_parser(config_class, description):
    """A trainer's parser: one option per field of its config (`add_config_options`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_config_options(parser, config_class)
    return parser


RUN_SETTINGS_NOTE = ("[run setting]: an option that defines the run. A new run takes it from the preset (or the "
                     "default named); --resume takes it from the run and refuses another value.")


def add_config_options(parser, config_class, names=None):
    """One option per field of the dataclass `config_class` (or per field in `names`), declared by
    the field (pipelines.train.run_config): --batch-size for batch_size, its help and choices from the
    field's metadata, its type from the annotation (int, float; a bool is a flag) or the metadata
    (a path: `user_path`). A run setting is left out of the namespace unless given (the config's
    None then means the preset's or the run's) and says so in its help; any other option, and a
    required one, defaults to the field's default. Fields kept off the command line are skipped.

    The options follow the root config's fields (those every trainer shares), then each subclass's
    own, the most specific first: a trainer's data before the model settings it inherits."""
    metadata, hints = field_metadata(config_class), typing.get_type_hints(config_class)
    defaults = {f.name: f.default for f in fields(config_class)}
    for name in names or option_order(config_class):
        option = metadata[name]
        if not option.get(COMMAND_LINE, True):
            continue
        if HELP not in option:
            raise TypeError(f"{config_class.__name__}.{name} has no help: declare it, or keep it off the command line")
        declared = {"choices": list(option[CHOICES])} if CHOICES in option else {}
        value_type = annotated_type(hints[name])
        if value_type is bool:
            declared["action"] = "store_true"
        elif option.get(PATH):
            declared["type"] = user_path
        elif value_type in (int, float):
            declared["type"] = value_type
        flag = "--" + name.replace("_", "-")
        if option.get(RUN_FIELD) and not option.get(REQUIRED):
            parser.epilog = RUN_SETTINGS_NOTE
            parser.add_argument(flag, default=argparse.SUPPRESS, help=f"{option[HELP]} [run setting]", **declared)
        else:
            parser.add_argument(flag, default=defaults[name], required=option.get(REQUIRED, False), help=option[HELP],
                                **declared)


def option_order(config_class):
    """The fields of a config class in the order of its options (`add_config_options`)."""
    classes = [cls for cls in config_class.__mro__ if is_dataclass(cls)]  # the config itself first, the root last
    names = [f.name for f in fields(classes[-1])]
    for cls in classes[:-1]:
        names += [name for name in cls.__dict__.get("__annotations__", {}) if name not in names]
    return names


def annotated_type(hint):
    """int for `int` or `int | None`; None where the annotation names no single type."""
    types = [t for t in typing.get_args(hint) if t is not type(None)] if typing.get_args(hint) else [hint]
    return types[0] if len(types) == 1 else None


def options_of(config_class, args):
    """The dataclass `config_class` made from the options of its fields in `args` (those the parser
    declared; the others keep their defaults): its checks refuse a bad value in one line."""
    given = vars(args)
    return config_class(**{f.name: given[f.name] for f in fields(config_class) if f.name in given})


def label_option(parser, forms, purpose, note=""):
    """--label in the one label grammar (pipelines.infer.generation.parse_label), taking `forms`."""
    parser.add_argument("--label", default=None, help=f"{purpose}: {label_forms(forms, explained=True)}{note}")


PIPELINE = ("vqvae", "top", "bottom")
PIXEL_MODEL = ("--ckpt", "a pixel model")  # the option instead of the pipeline, and what it gives


def add_model_options(parser, pixel_model=True, required=False, levels=False):
    """The model a script runs, one argument group: a pixel-space PixelSNAIL (--ckpt, where
    `pixel_model`) or the VQ-VAE-2 pipeline, a VQ-VAE and its two priors (--vqvae --top --bottom)
    or, where `levels`, one prior per level of a VQ-VAE of any number of levels (--vqvae --priors
    TOP [MIDDLE ...] BOTTOM); `chosen_model` says which was given. `required`: the pipeline is (a
    script that takes nothing else)."""
    about = "a pixel model (--ckpt), or " if pixel_model else ""
    priors = " or one prior per level, top first (--vqvae --priors TOP [MIDDLE ...] BOTTOM)" if levels else ""
    group = parser.add_argument_group(
        "model", f"{about}the pipeline: a VQ-VAE and its two priors (--vqvae --top --bottom){priors}")
    if pixel_model:
        group.add_argument("--ckpt", type=user_path, default=None,
                           help="a pixel-space PixelSNAIL: run directory or checkpoint file")
    for name, what in zip(PIPELINE, ("VQ-VAE", "top prior", "bottom prior")):
        # with --priors, the priors' two options are checked by chosen_model (either form)
        group.add_argument(f"--{name}", type=user_path, default=None, required=required and (name == "vqvae" or not levels),
                           help=f"the pipeline's {what}: run directory or checkpoint file")
    if levels:
        group.add_argument("--priors", type=user_path, nargs="+", default=None, metavar="PRIOR",
                           help="the pipeline's priors, one per level of the VQ-VAE, top first (TOP [MIDDLE ...] "
                           "BOTTOM): run directories or checkpoint files; instead of --top --bottom. It takes every "
                           "path after it: give a script's images before it")


def chosen_model(args, instead=PIXEL_MODEL):
    """The pipeline's paths, the VQ-VAE's then one prior per level top first ((vqvae, top, bottom)
    from --top --bottom; (vqvae, *priors) from --priors), or None where the option `instead` was
    given (a flag and what it gives: --ckpt, a pixel model, by default): exactly one of the two, and
    all of the pipeline's; None for `instead` where the pipeline is all a script takes."""
    paths = tuple(getattr(args, name) for name in PIPELINE)
    flag, what = instead or (None, None)
    other = flag is not None and getattr(args, flag.lstrip("-").replace("-", "_")) is not None
    priors = getattr(args, "priors", None)
    if priors is not None:
        return chosen_priors(args.vqvae, priors, paths, (flag, what) if other else None)
    pipeline = "--vqvae, --top and --bottom"
    if other and any(paths):
        raise ValueError(f"give {what} ({flag}) or the pipeline (--vqvae --top --bottom), not both: give either {flag} "
                         f"or {pipeline}")
    if not other and None in paths:
        missing = ", ".join(f"--{name}" for name, path in zip(PIPELINE, paths) if path is None)
        if not any(paths) and flag is not None:
            raise ValueError(f"give either {pipeline} (the pipeline) or {flag} ({what})")
        alternative = f": give either all three or {flag} ({what})" if flag else ""
        raise ValueError(f"the pipeline needs all three of {pipeline} (missing {missing}){alternative}")
    return None if other else paths


def chosen_priors(vqvae, priors, paths, other):
    """chosen_model for --priors: (vqvae, *priors); refuses --top / --bottom besides, the option
    `other` (flag, what it gives) where it was given too, fewer than two priors and no --vqvae."""
    given = [f"--{name}" for name, path in zip(PIPELINE[1:], paths[1:]) if path is not None]
    if given:
        raise ValueError(f"give the priors as --priors or as --top --bottom, not both (got --priors and {' and '.join(given)})")
    if other is not None:
        raise ValueError(f"give {other[1]} ({other[0]}) or the pipeline (--vqvae --priors), not both")
    if len(priors) < 2:
        raise ValueError(f"--priors takes one prior per level of the VQ-VAE, top first (at least two), got {len(priors)}")
    if vqvae is None:
        raise ValueError("--priors needs --vqvae: the VQ-VAE whose codes the priors draw")
    return (vqvae, *priors)


def check_paths_given(paths, args, what):
    """Refuses, in one line, a command whose positional paths (`what`) are missing; where --priors
    was given, says why they may be: it takes every path after it."""
    if paths:
        return
    taken = " (--priors takes every path after it: give them before --priors)" if getattr(args, "priors", None) else ""
    raise ValueError(f"give {what}{taken}")
