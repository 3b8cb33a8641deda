"""The runtime of a training run: the accelerator and its precision, the data loaders and their
order, reductions over processes, and the signals that stop a run.

The data order of every epoch is a function of (seed, epoch) and a resumed run skips the batches
its epoch already used, so resuming is exact (with `pipelines.train.run_state`). A run stops without
corrupting anything: on SIGINT / SIGTERM after the current step, having saved (`StopSignals`,
`Stopped`); on a NaN or infinite loss or gradient before the update reaches the weights
(`check_finite`).
"""

import hashlib
import math
import os
import signal
import threading
import time

import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import GradientAccumulationPlugin
from torch.utils.data import DataLoader, Sampler

from pipelines.device import check_processes


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


def make_accelerator(precision, compile=False, grad_accum=1, report_to=None, run_dir=None, device=None):
    """An Accelerator for 'bf16' or 'fp32' on `device` ('cpu' or 'cuda'; None: CUDA when present);
    refuses a launch that silently ran several copies.
    compile=True has `prepare` wrap the model in torch.compile (inductor). With grad_accum=A every
    optimizer step sums the gradients of A batches, counted by steps alone: an epoch's end never
    forces an early update, so a step is always A batches and resuming at a step stays exact.
    report_to names an accelerate tracker ("tensorboard") that logs into RUN_DIR/<report_to>."""
    accelerator = Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no",
        cpu=not torch.cuda.is_available() if device is None else device == "cpu",
        dynamo_backend="inductor" if compile else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum, sync_with_dataloader=False),
        log_with=report_to,
        project_dir=run_dir,
    )
    check_processes(accelerator)
    return accelerator


def batches_from(loader, step):
    """Yields batches forever, starting at batch `step` (counted over epochs) of an epoch-shuffled loader."""
    per_epoch = len(loader)
    epoch, skip = divmod(step, per_epoch)
    while True:
        loader.set_epoch(epoch)
        source = skip_first_batches(loader, skip) if skip else loader
        for batch in source:
            yield batch
        epoch, skip = epoch + 1, 0


def check_batch_fits(n_train, batch_size, processes):
    """Refuses a batch (over all processes) larger than the training set, which would make no batch."""
    if batch_size * processes > n_train:
        per_step = f" x {processes} processes = {batch_size * processes}" if processes > 1 else ""
        raise ValueError(f"--batch-size {batch_size}{per_step} is larger than the training set, which has {n_train} "
                         "records: choose a smaller --batch-size")


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
