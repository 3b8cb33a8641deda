"""Training PixelSNAIL, one `Task` of the loop in pipelines/train/loop.py for images
(`pipelines.train.pixels`) and VQ-VAE codes (`pipelines.train.priors`) alike. A `Source` says what
the data is and how a batch becomes the model's inputs (x, label, cond). Besides the loop's files,
a pixel run writes samples.png, a grid of samples from the Polyak-averaged (EMA) weights.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import Dataset

from pipelines.eval.stages import evaluate_bits
from pipelines.store.checkpoint import CHECKPOINT_NAME, PIXELSNAIL_KIND, save_checkpoint, write_image_grid
from pipelines.train import diagnostics, runtime
from pipelines.train.loop import Step, Task
from pipelines.train.run_config import BaseRunConfig, check_at_least, option_name, run_field, setting
from prior import PRESETS, PixelSNAIL, get_preset


@dataclass
class RunConfig(BaseRunConfig):
    """What every PixelSNAIL run has, whatever it trains on."""

    out: str = setting("runs/pixelsnail", "run directory (checkpoints, samples, log)")
    preset: str | None = run_field(choices=tuple(PRESETS))
    lr_decay: float | None = run_field(command_line=False)  # multiplied into the lr every step; None: the preset's
    dropout: float | None = run_field("dropout probability")  # None: the preset's
    label_dropout: float | None = run_field("probability of replacing a label by a learned null class (default 0), "
                                            "which classifier-free guidance (sample.py --guidance) needs")
    ema_decay: float | None = run_field("Polyak averaging of the weights, which evaluation, samples and "
                                        "model.safetensors use; 0: none, the weights themselves")  # None: the preset's
    n_samples: int = setting(16, "samples drawn into samples.png at the end")

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 0, "n_samples")
        if self.lr_decay is not None and not 0 < self.lr_decay <= 1:
            raise ValueError(f"--lr-decay must lie in (0, 1], got {self.lr_decay}")
        for name in ("ema_decay", "dropout", "label_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{option_name(name)} must lie in [0, 1), got {value}")

    def default_preset(self):
        return "cpu-small"

    def run_defaults(self):
        name = self.preset or self.default_preset()
        preset = get_preset(name)
        return {**super().run_defaults(), "preset": name, "batch_size": preset.batch_size, "lr": preset.lr,
                "lr_decay": preset.lr_decay, "ema_decay": preset.ema_decay, "dropout": preset.model.dropout,
                "label_dropout": 0.0}

    def preset_model(self, **data_fields):
        """The model of a new run: the preset's, with this run's dropouts and the fields its data fixes."""
        return get_preset(self.preset, dropout=self.dropout, label_dropout=self.label_dropout, **data_fields).model


@dataclass
class Source:
    """The data a PixelSNAIL run trains on."""

    train_set: Dataset
    test_set: Dataset
    inputs: Callable  # a batch from the loader -> (x, label or None, cond or None)
    metadata: dict = field(default_factory=dict)  # stored with every checkpoint
    identity: dict = field(default_factory=dict)  # what the data is beyond its record counts (Task.data_identity)


def write_samples(model, path, n, seed):
    """Draws n samples with a fixed seed and writes them as an image grid."""
    generator = torch.Generator(model.background.device).manual_seed(seed)
    write_image_grid(model.sample(n, generator=generator), path)


def bits_loss(net, inputs, model, batch):
    """The loss of one step: the batch's mean bits per dimension (per code), the likelihood in fp32
    (`net.output_nll`: `model` is `net` as the accelerator prepared it)."""
    x, label, cond = inputs(batch)
    bits = net.output_nll(x, model(x, label, cond)).mean()
    return Step(bits, bits)


class PixelSNAILTask(Task):
    """PixelSNAIL on a Source: Adam(0.95, 0.9995), Polyak averaging, the preset's learning-rate decay."""

    metric = "bits"
    betas = (0.95, 0.9995)

    def __init__(self, cfg, model_config, source, unit):
        super().__init__(cfg, model_config, source.train_set, source.test_set)
        self.source, self.unit = source, unit
        self.lr_decay, self.ema_decay = cfg.lr_decay, cfg.ema_decay

    def build(self, initialise):
        self.net = PixelSNAIL(self.model_config)
        if initialise:
            init_batch = next(iter(runtime.make_loader(self.train_set, 4 * self.cfg.batch_size, 0)))
            self.net.init_from_data(*self.source.inputs(init_batch))
        return self.net

    def loss(self, model, batch):
        return bits_loss(self.net, self.source.inputs, model, batch)

    def evaluate(self, model, loader, accelerator, max_batches=None):
        return {"test_bits": evaluate_bits(model, loader, accelerator, self.source.inputs, max_batches)}

    def checks(self):
        return [diagnostics.Overfitting("train_bits", "test_bits", f"bits/{self.unit}")]

    def evaluate_final(self, model, loader, accelerator):
        """Over the whole split in fp32, as scripts/evaluate.py computes it, whatever the training
        precision: on a copy of the weights that the accelerator never wrapped in its autocast."""
        fp32 = PixelSNAIL(self.model_config).to(accelerator.device)
        fp32.load_state_dict(model.state_dict())
        return {"test_bits": evaluate_bits(fp32, loader, accelerator, self.source.inputs, autocast=False)}

    def data_identity(self):
        return {**super().data_identity(), **self.source.identity}

    def write(self, model, out, step):
        save_checkpoint(out / CHECKPOINT_NAME, model.state_dict(), PIXELSNAIL_KIND, self.model_config, step=step,
                        **self.source.metadata)

    def finish(self, model, out, metrics, accelerator):
        if accelerator.is_main_process and self.cfg.n_samples and self.model_config.pixel_mode:
            write_samples(model, out / "samples.png", self.cfg.n_samples, self.cfg.seed)
            accelerator.print(f"samples: {out / 'samples.png'}")
        accelerator.print(f"test bits/{self.unit}: {metrics['test_bits']:.4f}")
        return metrics["test_bits"]
