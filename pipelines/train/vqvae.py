"""Training the VQ-VAE (two levels, or `--levels N`): one `Task` of the loop in pipelines/train/loop.py.

A run directory holds:
  model.safetensors    the weights and codebooks with the config and the image size: what code
                       extraction loads
  state/               everything `--resume` needs (weights, optimizer, RNG, progress)
  reconstructions.png  test images (top rows) above their reconstructions (bottom rows)
  log.jsonl            one line per evaluation: the reconstruction mse and, per level, the codebook
                       usage and perplexity under the level's name (`top_usage`, `middle_usage`, ...:
                       modelkit.level_names)
"""

from dataclasses import dataclass, replace

import torch

from pipelines.data.datasets import load_dataset, to_model_range
from pipelines.eval.stages import evaluate_vqvae, psnr_db
from pipelines.store.checkpoint import CHECKPOINT_NAME, VQVAE_KIND, save_checkpoint, write_image_grid
from pipelines.train import diagnostics, run_state
from pipelines.train.loop import Step, Task, fit
from pipelines.train.run_config import BaseRunConfig, check_at_least, image_data_field, run_field, setting
from prior.modes import evaluating
from vqvae import VQVAE2, VQVAE2Config
from vqvae.model import check_side
from vqvae.presets import PRESETS, get_preset


def logged(level_names):
    """The evaluator's figures a run logs (the rest, SSIM and the like, `evaluate.py vqvae` reports)."""
    return ("mse", *[f"{name}_perplexity" for name in level_names], *[f"{name}_usage" for name in level_names])


@dataclass
class VQVAETrainConfig(BaseRunConfig):
    data: str | None = image_data_field()
    size: int | None = run_field("image side, a multiple of 8, and of the top level's stride (default 256: "
                                 "32x32 top, 64x64 bottom codes)")
    out: str = setting("runs/vqvae", "run directory (checkpoint, reconstructions, log)")
    preset: str | None = run_field(choices=tuple(PRESETS))
    levels: int | None = run_field("levels of codes, each grid half the side of the one below (default: the "
                                   "preset's; 2 for vqvae2, 3 for vqvae2-ffhq1024)")
    steps: int = 2000
    eval_batches: int | None = 20
    n_images: int = setting(8, "test images in reconstructions.png")

    def __post_init__(self):
        super().__post_init__()
        if self.preset is not None:
            get_preset(self.preset)
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise ValueError(f"--size must be a positive multiple of 8, got {self.size}")
        check_at_least(self, 0, "n_images")
        if self.levels is not None and self.levels < 2:
            raise ValueError(f"--levels must be >= 2, got {self.levels}")

    def run_defaults(self):
        name = self.preset or "vqvae2"
        preset = get_preset(name)
        return {**super().run_defaults(), "preset": name, "batch_size": preset.batch_size, "lr": preset.lr,
                "data": "builtin", "size": 256, "levels": preset.model.levels}


@torch.no_grad()
def write_reconstructions(model, images, path):
    """Originals (top rows) above their reconstructions (bottom rows)."""
    x = to_model_range(images)
    with evaluating(model):
        reconstruction = model(x).reconstruction.float().clamp(-1, 1)
    write_image_grid(torch.cat([x, reconstruction]), path, nrow=min(len(x), 8))


def reconstruction_loss(model, batch):
    """The loss of one step: the VQ-VAE's loss; the progress bar follows the reconstruction error."""
    images, _ = batch
    result = model(to_model_range(images).contiguous(memory_format=torch.channels_last))
    postfix = {"ppl": "/".join(f"{level.perplexity.item():.0f}" for level in result.levels),
               "used": "/".join(f"{level.usage.item():.2f}" for level in result.levels)}
    return Step(result.loss, result.reconstruction_loss, postfix)


class VQVAETask(Task):
    metric = "mse"

    def summary(self):
        shapes = self.net.code_shapes(self.cfg.size)
        codes = ", ".join(f"{name} codes {shape}" for name, shape in zip(self.model_config.level_names, shapes))
        return f", {self.cfg.size}x{self.cfg.size} images -> {codes}"

    def build(self, initialise):
        # channels_last: oneDNN convolutions run faster on it (bench/results/vqvae.md)
        self.net = VQVAE2(self.model_config).to(memory_format=torch.channels_last)
        return self.net

    def loss(self, model, batch):
        return reconstruction_loss(model, batch)

    def checks(self):
        c = self.model_config
        images = len(self.test_set) if self.cfg.eval_batches is None else \
            min(len(self.test_set), self.cfg.eval_batches * self.cfg.batch_size)  # one process's share at least
        usage = [diagnostics.CodebookUsage(f"{level}_usage", min(1.0, images * h * w / size), f"{level} codebook")
                 for level, (h, w), size in zip(c.level_names, self.net.code_shapes(self.cfg.size), c.codebook_sizes())]
        return [diagnostics.Overfitting("train_mse", "mse", "reconstruction mse"), *usage]

    def evaluate(self, model, loader, accelerator, max_batches=None):
        metrics = evaluate_vqvae(model, loader, accelerator, max_batches)
        return {name: metrics[name] for name in logged(self.model_config.level_names)}

    def write(self, model, out, step):
        save_checkpoint(out / CHECKPOINT_NAME, model.state_dict(), VQVAE_KIND, self.model_config, step=step,
                        image_size=self.cfg.size)
        shown = [self.test_set[i][0] for i in range(min(self.cfg.n_images, len(self.test_set)))]
        if shown:
            device = next(model.parameters()).device
            write_reconstructions(model, torch.stack(shown).to(device), out / "reconstructions.png")

    def finish(self, model, out, metrics, accelerator):
        accelerator.print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "mse"))
        accelerator.print(f"test reconstruction mse: {metrics['mse']:.5f} (PSNR {psnr_db(metrics['mse']):.2f} dB)")
        return metrics["mse"]


def train(cfg: VQVAETrainConfig):
    """Trains (or resumes) a VQ-VAE run; returns the final test reconstruction MSE."""
    cfg, model_config = run_state.resolve(cfg, VQVAE2Config)
    model_config = model_config or replace(get_preset(cfg.preset).model, levels=cfg.levels)
    if model_config.levels != cfg.levels:  # a run from before --levels stored none: its model's
        raise ValueError(f"--levels {cfg.levels} differs from the run's levels {model_config.levels} ({cfg.out}): "
                         "a resumed run keeps its settings; leave --levels out, or start a new run in another --out")
    check_side("--size", cfg.size, model_config)
    train_set, test_set = load_dataset(cfg.data, "train", cfg.size), load_dataset(cfg.data, "test", cfg.size)
    return fit(VQVAETask(cfg, model_config, train_set, test_set))

