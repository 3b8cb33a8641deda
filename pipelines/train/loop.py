"""The one training loop. Every trainer (pixels, VQ-VAE-2 priors, the VQ-VAE) is a `Task`: the model
to build, the loss of one batch, what to evaluate and what to write. `fit` does the rest, the same
for all: the accelerator, the data order, exact resume, Polyak averaging, gradient accumulation,
periodic evaluation, checkpoints, denormal floats computed as zero on the CPU
(`pipelines.device.flush_denormals`), and stopping without corrupting anything (SIGINT / SIGTERM, a
NaN, a full disk, the time budget).

A run directory holds model.safetensors (what the other scripts load, written by the task),
state/ (what --resume needs), log.jsonl (one line per evaluation) and .lock (held while it trains).
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors import SafetensorError
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from pipelines.data.datasets import data_identity
from pipelines.device import flush_denormals, resolve_precision
from pipelines.store import run_files
from pipelines.store.outputs import os_error_of
from pipelines.train import diagnostics, run_state, runtime


@dataclass
class Step:
    """What the loss of one batch gives the loop."""

    loss: Tensor  # what the optimizer minimises
    shown: Tensor  # what the progress bar and the log follow (bits, reconstruction error)
    postfix: dict = field(default_factory=dict)  # more for the progress bar: name -> text


class Task:
    """What a trainer specialises. `cfg` is its resolved run config (pipelines.train.run_config)."""

    metric = "loss"  # the name of `Step.shown` in the progress bar, the log and the messages
    betas = (0.9, 0.999)  # Adam's
    lr_decay = 1.0  # multiplied into the learning rate every step
    ema_decay = 0.0  # Polyak averaging; the average (not the raw weights) is evaluated and written

    def __init__(self, cfg, model_config, train_set, test_set):
        self.cfg, self.model_config, self.train_set, self.test_set = cfg, model_config, train_set, test_set

    def summary(self):
        """What the first line of a new run says besides the preset and the parameter count."""
        return ""

    def build(self, initialise):
        """The model in training mode; `initialise`: a new run (a resumed one loads its weights)."""
        raise NotImplementedError

    def loss(self, model, batch) -> Step:
        raise NotImplementedError

    def evaluate(self, model, loader, accelerator, max_batches=None) -> dict:
        """Test metrics of `model` over the loader (all of it unless max_batches), for log.jsonl."""
        raise NotImplementedError

    def evaluate_final(self, model, loader, accelerator) -> dict:
        return self.evaluate(model, loader, accelerator)

    def write(self, model, out, step):
        """Writes model.safetensors (and what goes with it) of `model`; main process only."""
        raise NotImplementedError

    def finish(self, model, out, metrics, accelerator):
        """After the final evaluation: the last lines and files; returns what `fit` returns."""
        raise NotImplementedError

    def data_identity(self) -> dict:
        """What the run's data is, stored in its state and checked on resume (pipelines.data.datasets.data_identity)."""
        return data_identity(self.train_set, self.test_set)

    def checks(self) -> list:
        """The diagnostics (pipelines.train.diagnostics) run on every periodic evaluation; after `build`."""
        return []


def train_step(accelerator, model, optimizer, loss, batches, step, grad_clip):
    """One optimizer step, as every trainer runs it (and `bench.py train` times it): the loss of
    each of `accelerator.gradient_accumulation_steps` batches, checked to be finite over all
    processes before its backward, then the clipped gradient, checked too, then the update.
    `loss(model, batch) -> Step`. Returns the mean of `Step.shown` and the last Step."""
    shown = []
    for _ in range(accelerator.gradient_accumulation_steps):
        with accelerator.accumulate(model):
            result = loss(model, next(batches))
            shown.append(runtime.global_means(accelerator, step + 1, result.shown, result.loss)[0])
            accelerator.backward(result.loss)  # divided by the accumulation steps
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    runtime.check_finite(grad_norm, "the gradient norm", step + 1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(shown) / len(shown), result


@dataclass
class Run:
    """What the loop holds while it trains."""

    accelerator: object
    model: torch.nn.Module  # as prepared (wrapped for several processes)
    net: torch.nn.Module  # the model itself
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    train_loader: object
    test_loader: object
    progress: dict

    @property
    def weights(self):
        """The weights evaluated and written: the Polyak average, or the model without one."""
        return self.ema.module if self.ema is not None else self.net


def start(task, cfg, accelerator, out):
    """The loaders, model and optimizer of a run, new or resumed from `out` (whose lock is held)."""
    resuming = run_files.has_state(out)
    if resuming:
        run_state.check_same_data(cfg, task.data_identity())
    accelerator.wait_for_everyone()  # every process has read the run directory before anyone writes
    sampler = runtime.EpochShuffle(len(task.train_set), cfg.seed)
    train_loader = runtime.make_loader(task.train_set, cfg.batch_size, cfg.workers, sampler)
    test_loader = runtime.make_loader(task.test_set, cfg.batch_size, cfg.workers)
    set_seed(cfg.seed)  # the same initial weights on every process
    model = task.build(initialise=not resuming)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=task.betas)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    net = accelerator.unwrap_model(model, keep_torch_compile=False)  # weights without _orig_mod. in their names
    set_seed(cfg.seed, device_specific=True)  # but different dropout masks
    ema = None
    if task.ema_decay:
        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(task.ema_decay), use_buffers=True)
    if cfg.report_to:
        accelerator.init_trackers(cfg.report_to)
    identity = task.data_identity()
    progress = {"step": 0, "train_config": asdict(cfg), "model_config": task.model_config.to_json(), "data": identity}
    if resuming:  # the identity checked, with what a run made before it was kept did not store
        progress.update(run_state.load_state(accelerator, out, ema), train_config=asdict(cfg), data=identity)
        accelerator.print(f"resumed {out} at step {progress['step']}")
    else:
        run_state.start_new_log(accelerator, out)
        accelerator.print(f"new run {out}: preset {cfg.preset}, {net.num_parameters():,} parameters{task.summary()}")
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device}, precision "
                      f"{accelerator.mixed_precision}, {cfg.grad_accum} batch(es) of {cfg.batch_size} per step")
    return Run(accelerator, model, net, ema, optimizer, train_loader, test_loader, progress)


def checkpoint(task, run, out, step, running):
    """Saves the state and the task's files of `step`; a failed save (a full disk) stops the run in one line."""
    run.progress.update(step=step, running=running)  # running: the progress bar's average goes on after a resume
    try:
        run_state.save_state(run.accelerator, out, run.progress, run.ema)
        if run.accelerator.is_main_process:
            task.write(run.weights, out, step)
    except (OSError, SafetensorError, RuntimeError) as error:
        failure = os_error_of(error)
        if failure is None:
            raise
        raise run_state.save_failed(failure, out, step) from error


def fit(task):
    """Trains (or resumes) the task's run to cfg.steps or the time budget; returns task.finish(...)."""
    cfg, out = task.cfg, Path(task.cfg.out)
    accelerator = runtime.make_accelerator(resolve_precision(cfg.precision), cfg.compile, cfg.grad_accum,
                                           cfg.report_to, out)
    runtime.check_batch_fits(len(task.train_set), cfg.batch_size, accelerator.num_processes)
    with run_state.locked(accelerator, out), flush_denormals():  # after every check of the options and data
        run = start(task, cfg, accelerator, out)
        try:
            step, running = run_steps(task, run, out)
            return finish(task, run, out, step, running)
        finally:
            accelerator.end_training()  # closes the trackers, also when the run stops early


def run_steps(task, run, out):
    """The loop: steps, periodic evaluations and checkpoints until the last step, the time budget or a
    signal (which saves and raises Stopped). Returns the step reached and the running training value."""
    cfg, accelerator = task.cfg, run.accelerator
    step, running, started = run.progress["step"], run.progress.get("running"), time.monotonic()
    batches = runtime.batches_from(run.train_loader, step * cfg.grad_accum)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    with runtime.StopSignals() as signals, bar:  # the bar is closed (its line ended) however the loop ends
        while step < cfg.steps:
            for group in run.optimizer.param_groups:
                group["lr"] = cfg.lr * task.lr_decay**step
            shown, result = train_step(accelerator, run.model, run.optimizer, task.loss, batches, step, cfg.grad_clip)
            if run.ema is not None:
                run.ema.update_parameters(run.net)
            step += 1
            running = shown if running is None else 0.98 * running + 0.02 * shown
            bar.update()
            bar.set_postfix({task.metric: f"{running:.4f}", **result.postfix})

            out_of_time, signum = runtime.agreed_stop(accelerator, started, cfg.max_minutes, signals)
            last = step == cfg.steps or out_of_time or signum
            if step % cfg.eval_every == 0 and not last:
                metrics = task.evaluate(run.weights, run.test_loader, accelerator, cfg.eval_batches)
                bar.write(f"step {step}: train {task.metric} {running:.4f}, test ({cfg.eval_batches} batches) "
                          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                record = {"step": step, f"train_{task.metric}": running, "eval_batches": cfg.eval_batches, **metrics}
                warnings = diagnostics.new_warnings(task.checks(), run_files.read_log(out), record) \
                    if accelerator.is_main_process else {}
                for message in warnings.values():
                    bar.write(message)
                run_state.append_log(accelerator, out, {**record, "warnings": warnings} if warnings else record)
            if step % cfg.checkpoint_every == 0 or last:
                checkpoint(task, run, out, step, running)
            if signum:
                raise runtime.Stopped(signum, step)
            if out_of_time:
                bar.write(f"time budget of {cfg.max_minutes} min reached at step {step}; resume with --resume")
                break
    return step, running


def finish(task, run, out, step, running):
    """The final evaluation over the whole test split, the task's last files, the replica check."""
    accelerator = run.accelerator
    metrics = task.evaluate_final(run.weights, run.test_loader, accelerator)
    if not run_state.logged_final(out, step):  # else a finished run, resumed: its line is there
        run_state.append_log(accelerator, out, {"step": step, f"train_{task.metric}": running, "final": True,
                                                **metrics})
    if accelerator.num_processes > 1:
        runtime.check_replicas_agree(accelerator, run.net)
    accelerator.wait_for_everyone()
    return task.finish(run.weights, out, metrics, accelerator)
