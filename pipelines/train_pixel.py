"""Training PixelSNAIL with accelerate: on images (here) or on VQ-VAE codes (train_prior.py).

The loop (`fit`) is the same for both; a `Source` says what the data is and how a batch becomes
the model's inputs (x, label, cond). A run directory holds:
  model.safetensors   the Polyak-averaged (EMA) weights with the model config: what evaluation
                      and sampling use
  state/              everything `--resume` needs (weights, optimizer, EMA, RNG, progress)
  samples.png         a grid of samples from the EMA weights
  log.jsonl           one line per evaluation
"""

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset
from torchvision.utils import save_image
from tqdm.auto import tqdm

from pipelines import training
from pipelines.checkpoint import CHECKPOINT_NAME, PIXELSNAIL_KIND, atomic_path, save_checkpoint
from pipelines.data import load_dataset, to_model_range
from pipelines.run_config import BaseRunConfig, check_at_least, run_field
from prior import PixelSNAIL, PixelSNAILConfig, get_preset


@dataclass
class RunConfig(BaseRunConfig):
    """What every PixelSNAIL run has, whatever it trains on."""

    out: str = "runs/pixelsnail"
    lr_decay: float | None = run_field()  # multiplied into the learning rate every step; None: the preset's
    ema_decay: float | None = run_field()  # Polyak averaging of the weights; None: the preset's
    dropout: float | None = run_field()  # None: the preset's
    n_samples: int = 16

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 0, "n_samples")
        if self.lr_decay is not None and not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must lie in (0, 1], got {self.lr_decay}")
        for name in ("ema_decay", "dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")

    def default_preset(self):
        return "cpu-small"

    def run_defaults(self):
        name = self.preset or self.default_preset()
        preset = get_preset(name)
        return {**super().run_defaults(), "preset": name, "batch_size": preset.batch_size, "lr": preset.lr,
                "lr_decay": preset.lr_decay, "ema_decay": preset.ema_decay, "dropout": preset.model.dropout}

    def preset_model(self, **data_fields):
        """The model of a new run: the preset's, with this run's dropout and the fields its data fixes."""
        return get_preset(self.preset, dropout=self.dropout, **data_fields).model


@dataclass
class TrainConfig(RunConfig):
    data: str | None = run_field()  # "builtin" (scikit-image photo crops), CIFAR-10, ImageNet 32 or an image folder

    def run_defaults(self):
        return {**super().run_defaults(), "data": "builtin"}


@dataclass
class Source:
    """The data a PixelSNAIL run trains on."""

    train_set: Dataset
    test_set: Dataset
    inputs: Callable  # a batch from the loader -> (x, label or None, cond or None)
    metadata: dict = field(default_factory=dict)  # stored with every checkpoint


def image_inputs(batch):
    images, _ = batch
    return to_model_range(images), None, None


def image_source(data, size):
    return Source(load_dataset(data, "train", size), load_dataset(data, "test", size), image_inputs, {"data": data})


@torch.no_grad()
def evaluate_bits(model, loader, accelerator, inputs=image_inputs, max_batches=None, desc="test"):
    """Mean bits per dimension (per code) over the loader's examples, all of them unless
    max_batches, every process's share counted once."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n_batches = len(loader) if max_batches is None else min(max_batches, len(loader))
    bar = tqdm(total=n_batches, desc=desc, leave=False, disable=not accelerator.is_main_process)
    for i, batch in enumerate(loader):
        if i == n_batches:
            break
        with accelerator.autocast():
            bits = model.nll(*inputs(batch))
        bits = accelerator.gather_for_metrics(bits)
        total += bits.double().sum().item()
        count += bits.numel()
        bar.update()
    bar.close()
    model.train(was_training)
    return total / count


def write_samples(model, path, n, seed):
    """Draws n samples with a fixed seed and writes them as an image grid."""
    generator = torch.Generator(model.background.device).manual_seed(seed)
    samples = model.sample(n, generator=generator)
    with atomic_path(path) as tmp:
        save_image((samples + 1) / 2, tmp, format="png", nrow=int(math.ceil(math.sqrt(n))))


def train(cfg: TrainConfig):
    """Trains (or resumes) a run on images; returns the final test bits/dim with the EMA weights."""
    cfg, model_config = training.resolve(cfg, PixelSNAILConfig)
    model_config = model_config or cfg.preset_model()
    if model_config.shape[0] != model_config.shape[1] or not model_config.pixel_mode:
        raise ValueError(f"image training needs a square pixel-mode model, got {model_config.shape}")
    return fit(cfg, model_config, image_source(cfg.data, model_config.shape[0]), unit="dim")


def fit(cfg, model_config, source, unit):
    """The training loop shared by images and codes; returns the final test bits per `unit`."""
    accelerator = training.make_accelerator(training.resolve_precision(cfg.precision), cfg.compile)
    out = Path(cfg.out)
    resuming = training.has_state(out)
    accelerator.wait_for_everyone()  # every process has read the run directory before anyone writes
    sampler = training.EpochShuffle(len(source.train_set), cfg.seed)
    train_loader = training.make_loader(source.train_set, cfg.batch_size, cfg.workers, sampler)
    test_loader = training.make_loader(source.test_set, cfg.batch_size, cfg.workers)

    set_seed(cfg.seed)  # the same initial weights on every process
    model = PixelSNAIL(model_config)
    if not resuming:  # a resumed run loads its weights below
        init_batch = next(iter(training.make_loader(source.train_set, 4 * cfg.batch_size, 0)))
        model.init_from_data(*source.inputs(init_batch))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.95, 0.9995))
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    net = accelerator.unwrap_model(model)
    set_seed(cfg.seed, device_specific=True)  # but different dropout masks
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)

    out.mkdir(parents=True, exist_ok=True)
    progress = {"step": 0, "train_config": asdict(cfg), "model_config": model_config.to_json()}
    if resuming:
        progress.update(training.load_state(accelerator, out, ema), train_config=asdict(cfg))
        accelerator.print(f"resumed {out} at step {progress['step']}")
    else:
        training.start_new_log(accelerator, out)
        accelerator.print(f"new run {out}: preset {cfg.preset}, {net.num_parameters():,} parameters")
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device}, precision {accelerator.mixed_precision}")
    step = progress["step"]

    def checkpoint():
        progress["step"] = step
        try:
            training.save_state(accelerator, out, progress, ema)
            if accelerator.is_main_process:
                state = ema.module.state_dict()
                save_checkpoint(out / CHECKPOINT_NAME, state, PIXELSNAIL_KIND, model_config, step=step, **source.metadata)
        except OSError as error:
            raise training.save_failed(error, out, step) from error

    started = time.monotonic()
    batches = training.batches_from(train_loader, step)
    running = None
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    with training.StopSignals() as signals, bar:  # the bar is closed (its line ended) however the loop ends
        while step < cfg.steps:
            x, label, cond = source.inputs(next(batches)[1])
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * cfg.lr_decay**step
            bits = net.output_nll(x, model(x, label, cond)).mean()
            [mean_bits] = training.global_means(accelerator, step + 1, bits)
            accelerator.backward(bits)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            training.check_finite(grad_norm, "the gradient norm", step + 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update_parameters(net)
            step += 1

            running = mean_bits if running is None else 0.98 * running + 0.02 * mean_bits
            bar.update()
            bar.set_postfix({f"bits/{unit}": f"{running:.3f}"})

            out_of_time, signum = training.agreed_stop(accelerator, started, cfg.max_minutes, signals)
            last = step == cfg.steps or out_of_time or signum
            if step % cfg.eval_every == 0 and not last:
                test_bits = evaluate_bits(ema.module, test_loader, accelerator, source.inputs, cfg.eval_batches)
                bar.write(f"step {step}: train bits/{unit} {running:.4f}, test bits/{unit} (EMA, {cfg.eval_batches} batches) {test_bits:.4f}")
                training.append_log(accelerator, out, {"step": step, "train_bits": running, "test_bits_partial": test_bits})
            if step % cfg.checkpoint_every == 0 or last:
                checkpoint()
            if signum:
                raise training.Stopped(signum, step)
            if out_of_time:
                bar.write(f"time budget of {cfg.max_minutes} min reached at step {step}; resume with --resume")
                break

    test_bits = evaluate_bits(ema.module, test_loader, accelerator, source.inputs)
    training.append_log(accelerator, out, {"step": step, "train_bits": running, "test_bits": test_bits})
    if accelerator.is_main_process and cfg.n_samples and model_config.pixel_mode:
        write_samples(ema.module, out / "samples.png", cfg.n_samples, cfg.seed)
        accelerator.print(f"samples: {out / 'samples.png'}")
    if accelerator.num_processes > 1:
        training.check_replicas_agree(accelerator, net)
    accelerator.wait_for_everyone()
    accelerator.print(f"test bits/{unit}: {test_bits:.4f}")
    accelerator.end_training()
    return test_bits
