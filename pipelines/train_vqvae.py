"""Training the two-level VQ-VAE with accelerate.

A run directory holds:
  model.safetensors    the weights and codebooks with the config and the image size: what code
                       extraction loads
  state/               everything `--resume` needs (weights, optimizer, RNG, progress)
  reconstructions.png  test images (top rows) above their reconstructions (bottom rows)
  log.jsonl            one line per evaluation
"""

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torchvision.utils import save_image
from tqdm.auto import tqdm

from pipelines import training
from pipelines.checkpoint import CHECKPOINT_NAME, VQVAE_KIND, atomic_path, save_checkpoint
from pipelines.data import load_dataset, to_model_range
from pipelines.run_config import BaseRunConfig, check_at_least, run_field
from vqvae import VQVAE2, VQVAE2Config
from vqvae.presets import get_preset


@dataclass
class VQVAETrainConfig(BaseRunConfig):
    data: str | None = run_field()  # "builtin" (scikit-image photo crops), CIFAR-10, ImageNet 32 or an image folder
    size: int | None = run_field()  # image side, divisible by 8; None: 256
    out: str = "runs/vqvae"
    steps: int = 2000
    eval_batches: int | None = 20
    n_images: int = 8  # test images shown in reconstructions.png

    def __post_init__(self):
        super().__post_init__()
        if self.preset is not None:
            get_preset(self.preset)
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise ValueError(f"size must be a positive multiple of 8, got {self.size}")
        check_at_least(self, 0, "n_images")

    def run_defaults(self):
        name = self.preset or "vqvae2"
        preset = get_preset(name)
        return {**super().run_defaults(), "preset": name, "batch_size": preset.batch_size, "lr": preset.lr,
                "data": "builtin", "size": 256}


@torch.no_grad()
def evaluate_reconstruction(model, loader, accelerator, max_batches=None):
    """Mean squared reconstruction error per image (images in [-1, 1]) and mean code statistics."""
    was_training = model.training
    model.eval()
    totals = {"mse": 0.0, "top_perplexity": 0.0, "bottom_perplexity": 0.0, "top_usage": 0.0, "bottom_usage": 0.0}
    n_images, n_batches = 0, len(loader) if max_batches is None else min(max_batches, len(loader))
    for i, (images, _) in enumerate(tqdm(loader, total=n_batches, desc="test", leave=False,
                                         disable=not accelerator.is_main_process)):
        if i == n_batches:
            break
        x = channels_last(to_model_range(images))
        with accelerator.autocast():
            out = model(x)
        errors = accelerator.gather_for_metrics((out.reconstruction.float() - x).square().mean(dim=(1, 2, 3)))
        totals["mse"] += errors.double().sum().item()
        n_images += errors.numel()
        for level in ("top", "bottom"):
            stats = getattr(out, level)
            totals[f"{level}_perplexity"] += accelerator.reduce(stats.perplexity.float(), "mean").item()
            totals[f"{level}_usage"] += accelerator.reduce(stats.usage.float(), "mean").item()
    model.train(was_training)
    return {name: value / (n_images if name == "mse" else n_batches) for name, value in totals.items()}


@torch.no_grad()
def write_reconstructions(model, images, path):
    """Originals (top rows) above their reconstructions (bottom rows)."""
    was_training = model.training
    model.eval()
    x = to_model_range(images)
    reconstruction = model(x).reconstruction.float().clamp(-1, 1)
    model.train(was_training)
    with atomic_path(path) as tmp:
        save_image((torch.cat([x, reconstruction]) + 1) / 2, tmp, format="png", nrow=min(len(x), 8))


def train(cfg: VQVAETrainConfig):
    """Trains (or resumes) a VQ-VAE run; returns the final test reconstruction MSE."""
    cfg, model_config = training.resolve(cfg, VQVAE2Config)
    model_config = model_config or get_preset(cfg.preset).model
    accelerator = training.make_accelerator(training.resolve_precision(cfg.precision), cfg.compile)
    accelerator.wait_for_everyone()  # every process has read the run directory before anyone writes
    train_set = load_dataset(cfg.data, "train", cfg.size)
    test_set = load_dataset(cfg.data, "test", cfg.size)
    sampler = training.EpochShuffle(len(train_set), cfg.seed)
    train_loader = training.make_loader(train_set, cfg.batch_size, cfg.workers, sampler)
    test_loader = training.make_loader(test_set, cfg.batch_size, cfg.workers)

    set_seed(cfg.seed)
    # channels_last: 1.6x faster bf16 training here (bench/results/vqvae.md)
    model = VQVAE2(model_config).to(memory_format=torch.channels_last)
    top_shape, bottom_shape = model.code_shapes(cfg.size)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    net = accelerator.unwrap_model(model)
    set_seed(cfg.seed, device_specific=True)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = {"step": 0, "train_config": asdict(cfg), "model_config": model_config.to_json()}
    if training.has_state(out):
        progress.update(training.load_state(accelerator, out), train_config=asdict(cfg))
        accelerator.print(f"resumed {out} at step {progress['step']}")
    else:
        training.start_new_log(accelerator, out)
        accelerator.print(
            f"new run {out}: preset {cfg.preset}, {net.num_parameters():,} parameters, "
            f"{cfg.size}x{cfg.size} images -> top codes {top_shape}, bottom codes {bottom_shape}"
        )
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device}, precision {accelerator.mixed_precision}")
    step = progress["step"]
    shown = [test_set[i][0] for i in range(min(cfg.n_images, len(test_set)))]  # none with --n-images 0

    def checkpoint():
        progress["step"] = step
        try:
            training.save_state(accelerator, out, progress)
            if accelerator.is_main_process:
                save_checkpoint(out / CHECKPOINT_NAME, net.state_dict(), VQVAE_KIND, model_config, step=step, image_size=cfg.size)
                if shown:
                    write_reconstructions(net, torch.stack(shown).to(accelerator.device), out / "reconstructions.png")
        except OSError as error:
            raise training.save_failed(error, out, step) from error

    started = time.monotonic()
    batches = training.batches_from(train_loader, step)
    running = None
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    with training.StopSignals() as signals, bar:  # the bar is closed (its line ended) however the loop ends
        while step < cfg.steps:
            images, _ = next(batches)[1]
            result = model(channels_last(to_model_range(images)))
            # the total loss only for its check: a NaN or inf stops the run
            mse, _ = training.global_means(accelerator, step + 1, result.reconstruction_loss, result.loss)
            accelerator.backward(result.loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            training.check_finite(grad_norm, "the gradient norm", step + 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            running = mse if running is None else 0.98 * running + 0.02 * mse
            bar.update()
            bar.set_postfix(
                mse=f"{running:.4f}",
                ppl=f"{result.top.perplexity.item():.0f}/{result.bottom.perplexity.item():.0f}",
                used=f"{result.top.usage.item():.2f}/{result.bottom.usage.item():.2f}",
            )

            out_of_time, signum = training.agreed_stop(accelerator, started, cfg.max_minutes, signals)
            last = step == cfg.steps or out_of_time or signum
            if step % cfg.eval_every == 0 and not last:
                metrics = evaluate_reconstruction(net, test_loader, accelerator, cfg.eval_batches)
                bar.write(f"step {step}: train mse {running:.4f}, " + ", ".join(f"test {k} {v:.4f}" for k, v in metrics.items()))
                training.append_log(accelerator, out, {"step": step, "train_mse": running, **metrics})
            if step % cfg.checkpoint_every == 0 or last:
                checkpoint()
            if signum:
                raise training.Stopped(signum, step)
            if out_of_time:
                bar.write(f"time budget of {cfg.max_minutes} min reached at step {step}; resume with --resume")
                break

    metrics = evaluate_reconstruction(net, test_loader, accelerator)
    training.append_log(accelerator, out, {"step": step, "train_mse": running, "final": True, **metrics})
    if accelerator.num_processes > 1:
        training.check_replicas_agree(accelerator, net)
    accelerator.wait_for_everyone()
    accelerator.print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "mse"))
    accelerator.print(f"test reconstruction mse: {metrics['mse']:.5f} (PSNR {psnr(metrics['mse']):.2f} dB)")
    accelerator.end_training()
    return metrics["mse"]


def channels_last(images):
    return images.contiguous(memory_format=torch.channels_last)


def psnr(mse):
    """Peak signal-to-noise ratio of images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4 / mse) if mse > 0 else float("inf")
