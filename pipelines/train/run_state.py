"""A run directory, written by its trainer: the state `--resume` needs, the run's stored settings,
and its log (their names and readers: `pipelines.store.run_files`).

`accelerator.save_state` keeps the weights, the optimizer and every process's RNG. Our own extras
(EMA weights, progress counters, the configs) are written beside them as safetensors and JSON, so
loading never unpickles anything of ours. The state directory is replaced atomically: a kill while
saving leaves the previous one, and a failed save (full disk) keeps it (`save_failed`).

Loading the state runs no code from it: accelerate torch.loads the optimizer and RNG files, and
every such file is first checked to load with `weights_only=True` (plain tensors and containers);
a file that does not, or any other damage, stops the resume with StateError naming it.

One trainer at a time: a run holds an advisory lock on RUN_DIR/.lock for its life (`locked`); the
kernel releases it when the process ends, however it ends, so a killed run leaves no stale lock.
"""

import fcntl
import json
import os
import shutil
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipelines.data.datasets import absolute_spec
from pipelines.errors import one_line
from pipelines.store.checkpoint import CHECKPOINT_NAME
from pipelines.store.outputs import check_output
from pipelines.store.run_files import (EMA_FILE, LOCK_FILE, LOG_FILE, PICKLED_STATE_PATTERNS, PROGRESS_FILE, STATE_DIR,
                                       StateError, has_state, read_progress, state_dir)
from pipelines.train.run_config import data_fields, run_fields, with_defaults


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
            for file in tmp.glob("*.safetensors"):  # safetensors writes 0600; the umask decides, as elsewhere
                file.chmod((tmp / PROGRESS_FILE).stat().st_mode)
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
    """What is wrong with a file torch.load(mmap=True, weights_only=True) refused, in one line."""
    return "not a torch.save zip archive" if "mmap can only be used" in str(error) else one_line(error, 300)


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
    """The run's settings, before any of its data is opened: (cfg with every run setting filled and
    its data paths absolute, the stored model config, or None for a new run). A directory that holds
    a run needs --resume; --resume needs one; a model.safetensors without state is never replaced
    unless --overwrite says so; an --out that could not be written is refused (pipelines.store.outputs)."""
    out, model_config = check_output(cfg.out, "--out", directory=True), None
    model = out / CHECKPOINT_NAME
    if has_state(out):
        if not cfg.resume:
            raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        cfg, model_config = restored(cfg, model_config_class)
    elif cfg.resume:
        way_out = (f"{model} has no {STATE_DIR}/ beside it: choose another --out, or start a new run over it with "
                   "--overwrite" if model.exists() else "check --out, or start a new run without --resume")
        raise FileNotFoundError(f"--resume: {out} holds no run to resume; {way_out}")
    elif model.exists() and not cfg.overwrite:
        raise FileExistsError(f"{model} exists but {out} holds no {STATE_DIR}/ to resume it: choose another --out, "
                              "or pass --overwrite to start a new run that replaces it")
    cfg = with_defaults(cfg)
    return replace(cfg, **{name: absolute_spec(getattr(cfg, name)) for name in data_fields(type(cfg))}), model_config


def restored(cfg, model_config_class):
    """cfg with the run settings its run directory stored, and the stored model config; a setting
    given with another value than the run's is refused, naming both. A data path given anew is
    taken: its data is checked to be the run's when the run starts (`check_same_data`)."""
    out = Path(cfg.out)
    progress = read_progress(out)
    try:
        stored = {name: progress["train_config"][name] for name in run_fields(type(cfg))
                  if name in progress["train_config"]}  # a setting newer than the run: its default
        model_config = model_config_class.from_json(progress["model_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"{state_dir(out) / PROGRESS_FILE} does not describe a run of this kind ({error!r})") from None
    for name in data_fields(type(cfg)):
        if getattr(cfg, name) is not None:
            stored.pop(name, None)
    for name, value in stored.items():
        given = getattr(cfg, name)
        if given is not None and given != value:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{option} {given} differs from the run's {name} {value} ({out}): a resumed run keeps "
                             f"its settings; leave {option} out, or start a new run in another --out")
    return replace(cfg, **stored), model_config


def check_same_data(cfg, identity):
    """Refuses to resume the run in cfg.out on data other than its own, naming both: `identity` (what
    the data cfg names is: pipelines.data.datasets.data_identity, and a code database's VQ-VAE) must
    agree with what the run stored. What a run did not store (made before it was kept) is not
    checked; the resumed run stores it from then on."""
    progress = read_progress(cfg.out)
    stored = progress.get("data") or {}
    differences = [_difference(key, identity.get(key), stored[key]) for key in sorted(stored)
                   if identity.get(key) != stored[key]]
    if not differences:
        return
    names = data_fields(type(cfg))
    given = ", ".join(f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in names)
    theirs = ", ".join(str(progress["train_config"].get(name)) for name in names)
    raise ValueError(f"{given} is not the data the run in {cfg.out} was trained on ({theirs}): "
                     f"{'; '.join(differences)}; give the run's data, or start a new run in another --out")


def _difference(key, given, stored):
    """How the data given differs from the run's in one identity field, in words."""
    if key.endswith("_fingerprint"):
        return f"its {key.removesuffix('_fingerprint')} files differ (names, sizes or modification times)"
    return f"{key} {given} there, {stored} in the run"


@contextmanager
def locked(accelerator, run_dir):
    """Holds RUN_DIR's lock (creating the directory) while the block runs; refuses, on every process,
    a directory that another trainer holds. Only the main process takes it: the others follow
    its answer, so all of a launch start or none. A directory made here is removed again if the
    block fails before writing anything into it (a refused trainer creates no run directory)."""
    run_dir, lock, refusal = Path(run_dir), None, f"{run_dir} is in use by another trainer"
    created = not run_dir.exists()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal += f" (process {os.read(lock, 20).decode(errors='replace').strip()})"
            os.close(lock)
            lock = None
        else:
            with suppress(OSError):  # the process id only serves the refusal's message: a full disk may refuse it
                os.ftruncate(lock, 0)
                os.write(lock, f"{os.getpid()}\n".encode())
    mine = torch.tensor([int(accelerator.is_main_process and lock is None)], device=accelerator.device)
    if accelerator.gather(mine).any():
        raise BlockingIOError(f"{refusal}: wait for it to end, or choose another --out")
    try:
        yield
    except BaseException:
        if lock is not None and created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            (run_dir / LOCK_FILE).unlink()
            run_dir.rmdir()
        raise
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


def save_failed(error, run_dir, step):
    """An OSError raised while saving step `step` -> one line saying what failed and what is kept."""
    kept = f"the state of step {read_progress(run_dir)['step']} is kept" if has_state(run_dir) else "no state was saved"
    return OSError(f"saving step {step} in {run_dir} failed ({error.strerror or error}); {kept}")


def start_new_log(accelerator, run_dir):
    """A new run starts RUN_DIR/log.jsonl afresh: lines there are from a run that stopped before its
    first checkpoint (else the directory would hold its state), and are not this run's."""
    if accelerator.is_main_process:
        (Path(run_dir) / LOG_FILE).unlink(missing_ok=True)


def logged_final(run_dir, step):
    """Whether RUN_DIR/log.jsonl ends with the final line of step `step` (a finished run resumed)."""
    try:
        lines = (Path(run_dir) / LOG_FILE).read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return False
    return isinstance(last, dict) and last.get("final") is True and last.get("step") == step


def append_log(accelerator, run_dir, record):
    """Appends one JSON line to RUN_DIR/log.jsonl (main process only); the accelerator's trackers,
    if any, log its numbers at its step."""
    accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                    step=record["step"])
    if accelerator.is_main_process:
        with open(Path(run_dir) / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
