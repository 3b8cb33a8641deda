"""What every trainer here shares: the accelerator, the data order, and the run directory's state.

Resuming is exact: the data order of every epoch is a function of (seed, epoch), a resumed run
skips the batches its epoch already used, and `accelerator.save_state` keeps the weights, the
optimizer and every process's RNG. Our own extras (EMA weights, progress counters, the config)
are written beside them as safetensors and JSON, so loading never unpickles anything of ours.
The state directory is replaced atomically: a kill while saving leaves the previous one.

Loading the state runs no code from it: accelerate torch.loads the optimizer and RNG files, and
every such file is first checked to load with `weights_only=True` (plain tensors and containers);
a file that does not, or any other damage, stops the resume with StateError naming it.

A run stops without corrupting anything: on SIGINT / SIGTERM after the current step, having saved
(`StopSignals`, `Stopped`); on a NaN or infinite loss or gradient before the update reaches the
weights (`check_finite`); on a failed save (full disk) with the previous state in place (`save_failed`).
"""

import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler

STATE_DIR = "state"
PROGRESS_FILE = "progress.json"
EMA_FILE = "ema.safetensors"
LOG_FILE = "log.jsonl"
PICKLED_STATE_PATTERNS = ("*.bin", "*.pkl")  # what accelerate's load_state torch.loads (optimizer, RNG, ...)


class StateError(ValueError):
    """A run's state directory that cannot be resumed from: damaged, foreign, or holding code."""


class EpochShuffle(Sampler):
    """A random order of n indices that depends only on (seed, epoch): reproducible on resume
    and identical on every process (accelerate then gives each process its share)."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self):
        return self.n


def cpu_supports_bf16():
    """True when the CPU has native bf16 arithmetic (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision, device=None):
    """'auto' -> 'bf16' where the device ('cpu' or 'cuda'; None: CUDA when present) computes bf16
    natively, else 'fp32'."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def make_accelerator(precision, compile=False, device=None):
    """An Accelerator for 'bf16' or 'fp32' on `device` ('cpu' or 'cuda'; None: CUDA when present);
    refuses a launch that silently ran several copies. compile=True has `prepare` wrap the model
    in torch.compile (inductor)."""
    accelerator = Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no",
        cpu=not torch.cuda.is_available() if device is None else device == "cpu",
        dynamo_backend="inductor" if compile else "no",
    )
    check_processes(accelerator)
    return accelerator


def check_processes(state):
    """Refuses a launch whose processes do not see each other (an Accelerator or accelerate's
    PartialState); gives each CPU process its share of the cores."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if state.num_processes != world_size:
        raise RuntimeError(
            f"launched as {world_size} processes but accelerate sees {state.num_processes}: "
            "on CPU use `accelerate launch --multi_gpu --num_processes N` (this code selects the CPU) or torchrun"
        )
    if state.device.type == "cpu" and state.num_processes > 1:
        # several processes with several threads each thrash the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))


def batches_from(loader, step):
    """Yields (epoch, batch) forever, starting at global step `step` of an epoch-shuffled loader."""
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("the training set is smaller than one batch")
    epoch, skip = divmod(step, per_epoch)
    while True:
        loader.set_epoch(epoch)
        source = skip_first_batches(loader, skip) if skip else loader
        for batch in source:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


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


def default_workers():
    """DataLoader workers per process when the user gives none: on a GPU, enough CPU cores to keep
    it fed; on CPU none, as the cores are the model's and a batch costs little against a step."""
    if not torch.cuda.is_available():
        return 0
    processes = max(1, int(os.environ.get("WORLD_SIZE", 1)))
    return min(8, max(1, (os.cpu_count() or 1) // processes - 1))


def make_loader(dataset, batch_size, workers=None, sampler=None):
    """A DataLoader; with an EpochShuffle sampler it is a training loader (incomplete batches dropped).
    workers=None takes `default_workers()`; workers persist across epochs, batches are pinned on GPU.

    It has a generator of its own, so starting an iterator (which draws the workers' base seed)
    leaves the global RNG alone: that RNG drives dropout and codebook restarts, and a resumed run
    starts its iterator at another moment than an uninterrupted one.
    """
    workers = default_workers() if workers is None else workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=sampler is not None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),
    )


def stored_run(cfg, run_fields, config_class):
    """For a run directory that already holds a run: (cfg with the run's own `run_fields`, the
    stored model config). None for a new run. Refuses to touch an existing run without --resume."""
    out = Path(cfg.out)
    if not has_state(out):
        return None
    if not cfg.resume:
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    stored = read_progress(out)
    try:
        kept = {name: stored["train_config"][name] for name in run_fields}
        return replace(cfg, **kept), config_class.from_json(stored["model_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"{state_dir(out) / PROGRESS_FILE} does not describe a run of this kind ({error!r})") from None


def global_means(accelerator, step, *losses):
    """The means of scalar losses over processes, as floats, in one reduction; stops the run if
    any is not finite."""
    means = accelerator.reduce(torch.stack([loss.detach().float() for loss in losses]), "mean").tolist()
    for mean in means:
        check_finite(mean, "the loss", step)
    return means


def check_finite(value, what, step):
    """Raises FloatingPointError naming the step when `value` is NaN or infinite. Called before the
    optimizer step, so the weights (and every checkpoint written later) never hold the bad update."""
    value = float(value)
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value} at step {step}: stopped before updating the weights; "
                                 "the last checkpoint is kept")


class Stopped(Exception):
    """Training stopped on SIGINT or SIGTERM after saving its state. `exit_code` is 128 + the
    signal number, as a shell reports a process the signal ended: 130 (SIGINT), 143 (SIGTERM)."""

    def __init__(self, signum, step):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}, state saved: continue with --resume")


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM only set `received` (the signal number); the loop
    reads it after each step, saves and raises `Stopped`. Nothing is saved inside the handler,
    which could interrupt a save in progress. A second SIGINT (Ctrl-C pressed again) raises
    KeyboardInterrupt: stop at once, unsaved; the state on disk stays the previous complete one.

    Under `accelerate launch` (torchrun) the workers run in sessions of their own: a terminal's
    Ctrl-C reaches them once, forwarded by the launcher.
    """

    def __init__(self):
        self.received, self.previous = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum


def agreed_stop(accelerator, started, max_minutes, signals):
    """Whether to stop after this step, the same on every process: (out of time, signal number or
    0), each the maximum over processes, from one all-gather of two numbers."""
    over = max_minutes is not None and time.monotonic() - started > 60 * max_minutes
    mine = torch.tensor([int(over), signals.received], device=accelerator.device)
    out_of_time, signum = accelerator.gather(mine).view(-1, 2).amax(dim=0).tolist()
    return bool(out_of_time), signum


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
    """Appends one JSON line to RUN_DIR/log.jsonl (main process only)."""
    if accelerator.is_main_process:
        with open(Path(run_dir) / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def check_replicas_agree(accelerator, model):
    """Raises unless every process holds the same parameters and buffers (codebooks included)."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    mine = torch.tensor(list(digest.digest()[:16]), device=accelerator.device)
    every = accelerator.gather(mine).view(accelerator.num_processes, -1)
    if not bool((every == every[0]).all()):
        raise RuntimeError("the processes ended with different parameters: distributed training went wrong")
    accelerator.print(f"parameters identical on all {accelerator.num_processes} processes")
