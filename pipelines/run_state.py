"""A run directory on disk: the state `--resume` needs, the run's stored settings, and its log.

`accelerator.save_state` keeps the weights, the optimizer and every process's RNG. Our own extras
(EMA weights, progress counters, the configs) are written beside them as safetensors and JSON, so
loading never unpickles anything of ours. The state directory is replaced atomically: a kill while
saving leaves the previous one, and a failed save (full disk) keeps it (`save_failed`).

Loading the state runs no code from it: accelerate torch.loads the optimizer and RNG files, and
every such file is first checked to load with `weights_only=True` (plain tensors and containers);
a file that does not, or any other damage, stops the resume with StateError naming it.
"""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipelines.run_config import run_fields, with_defaults

STATE_DIR = "state"
PROGRESS_FILE = "progress.json"
EMA_FILE = "ema.safetensors"
LOG_FILE = "log.jsonl"
PICKLED_STATE_PATTERNS = ("*.bin", "*.pkl")  # what accelerate's load_state torch.loads (optimizer, RNG, ...)


class StateError(ValueError):
    """A run's state directory that cannot be resumed from: damaged, foreign, or holding code."""


def has_state(run_dir):
    run_dir = Path(run_dir)
    return (run_dir / STATE_DIR).is_dir() or (run_dir / f"{STATE_DIR}.old").is_dir()


def save_state(accelerator, run_dir, progress, ema=None):
    """Saves everything `--resume` needs into RUN_DIR/state, replacing the old state atomically.

    The new state is written whole into state.tmp (removed again if writing fails, a full disk
    say), then swapped in by two renames; a state.old left by an interrupted clean-up is stale
    while state exists, and the live state while it does not (see `state_dir`).
    """
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / STATE_DIR, run_dir / f"{STATE_DIR}.tmp", run_dir / f"{STATE_DIR}.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            if ema is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, tmp / EMA_FILE)
            (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def state_dir(run_dir):
    """The state to resume from: RUN_DIR/state, or state.old if a kill landed between renames."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / STATE_DIR, run_dir / f"{STATE_DIR}.old"):
        if (candidate / PROGRESS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no resumable state in {run_dir}")


def read_progress(run_dir):
    """The progress dict of a run's state (step, train and model configs), checked to be one."""
    file = state_dir(run_dir) / PROGRESS_FILE
    try:
        progress = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        progress = None
    if not (isinstance(progress, dict) and {"step", "train_config", "model_config"} <= progress.keys()):
        raise StateError(f"{file} is damaged: expected JSON with step, train_config and model_config")
    return progress


def check_pickled_state(directory):
    """Refuses, naming it, any file of `directory` that accelerate would torch.load and that does not
    load with weights_only=True, as accelerate saved it (a torch.save zip of tensors and containers).

    accelerate 1.x loads these files with weights_only=True too, but skips an RNG file it cannot
    load without a word (the resume would be silently inexact) and loads custom_checkpoint_*.pkl
    with weights_only=False; after this check, no file it reads can hold code. With mmap=True the
    tensors' bytes are mapped, not read, so the check costs little even for a large optimizer.
    """
    for pattern in PICKLED_STATE_PATTERNS:
        for file in sorted(directory.glob(pattern)):
            try:
                accelerate_load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # an unpickling error, a damaged zip, ...: all mean "not ours"
                raise StateError(
                    f"{file} is not plain tensor data as accelerate saves it (refused; nothing in it was run): "
                    f"{_torch_load_reason(error)}"
                ) from None


def _torch_load_reason(error):
    """The line of a torch.load error that says what is wrong (not its advice to load unsafely)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").split(". Please use")[0].strip()
    if "mmap can only be used" in str(error):
        return "not a torch.save zip archive"
    return lines[0] if lines else type(error).__name__


def load_state(accelerator, run_dir, ema=None):
    """Restores weights, optimizer, RNG (and EMA) from RUN_DIR/state; returns the progress dict."""
    directory = state_dir(run_dir)
    progress = read_progress(run_dir)
    check_pickled_state(directory)
    try:
        accelerator.load_state(str(directory))
        if ema is not None:
            ema.load_state_dict(load_file(directory / EMA_FILE))
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as error:
        message = " ".join(str(error).split())
        raise StateError(f"cannot resume from {directory}: {message}") from None
    return progress


def resolve(cfg, model_config_class):
    """The run's settings, before any of its data is opened: (cfg with every run setting filled,
    the stored model config, or None for a new run). A directory that holds a run needs --resume."""
    out, model_config = Path(cfg.out), None
    if has_state(out):
        if not cfg.resume:
            raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        cfg, model_config = restored(cfg, model_config_class)
    return with_defaults(cfg), model_config


def restored(cfg, model_config_class):
    """cfg with the run settings its run directory stored, and the stored model config; a setting
    given with another value than the run's is refused, naming both."""
    out = Path(cfg.out)
    progress = read_progress(out)
    try:
        stored = {name: progress["train_config"][name] for name in run_fields(type(cfg))
                  if name in progress["train_config"]}  # a setting newer than the run: its default
        model_config = model_config_class.from_json(progress["model_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"{state_dir(out) / PROGRESS_FILE} does not describe a run of this kind ({error!r})") from None
    for name, value in stored.items():
        given = getattr(cfg, name)
        if given is not None and given != value:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{option} {given} differs from the run's {name} {value} ({out}): a resumed run keeps "
                             f"its settings; leave {option} out, or start a new run in another --out")
    return replace(cfg, **stored), model_config


def save_failed(error, run_dir, step):
    """An OSError raised while saving step `step` -> one line saying what failed and what is kept."""
    kept = f"the state of step {read_progress(run_dir)['step']} is kept" if has_state(run_dir) else "no state was saved"
    return OSError(f"saving step {step} in {run_dir} failed ({error.strerror or error}); {kept}")


def start_new_log(accelerator, run_dir):
    """A new run starts RUN_DIR/log.jsonl afresh: lines there are from a run that stopped before its
    first checkpoint (else the directory would hold its state), and are not this run's."""
    if accelerator.is_main_process:
        (Path(run_dir) / LOG_FILE).unlink(missing_ok=True)


def append_log(accelerator, run_dir, record):
    """Appends one JSON line to RUN_DIR/log.jsonl (main process only); the accelerator's trackers,
    if any, log its numbers at its step."""
    accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                    step=record["step"])
    if accelerator.is_main_process:
        with open(Path(run_dir) / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


