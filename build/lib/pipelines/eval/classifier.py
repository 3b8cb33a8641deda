"""A small CNN image classifier: the judge of samples where no Inception network is at hand.

Classification Accuracy Score (Ravuri and Vinyals 2019) trains it on a generator's class-conditional
samples and tests it on real held-out images; trained on real images, it gives the ceiling. Its
penultimate layer (`features`) is the feature space of the local FID / KID, which are therefore
comparable only with each other, never with Inception FID.

Stages of 3x3 conv, batch norm, ReLU; every stage but the last halves the side (max pool), the last
is averaged over space into the features; a linear layer maps them to class logits. Images larger
than 32x32 enter through a strided first conv, so a 64x64 crop costs about what a 32x32 one does.

Example, on 32x32 crops of 6 classes:
    >>> config = ClassifierConfig(n_classes=6, image_size=32)
    >>> model = train_classifier(images, labels, config, seed=0)   # images (N, 3, 32, 32) uint8, labels (N,)
    >>> model.predict(images)                                      # (N,) int64 classes
    >>> model.features(images)                                     # (N, 64) float32, the penultimate layer
    >>> save_classifier(model, "classifier.safetensors"); load_classifier("classifier.safetensors")
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from modelkit import JSONConfig
from pipelines.data.datasets import to_model_range
from pipelines.store.checkpoint import load_model, save_checkpoint

CLASSIFIER_KIND = "classifier"
PREDICT_BATCH = 256  # images per forward in predict / features: bounded memory for any N


@dataclass
class ClassifierConfig(JSONConfig):
    n_classes: int  # number of classes, labels 0..n_classes-1
    image_size: int = 32  # side S of the (3, S, S) images it takes
    widths: tuple = (16, 32, 64)  # channels of each stage; the last is the feature dimension
    stem_stride: int = 0  # stride of the first conv; 0: image_size // 32 (at least 1)

    def __post_init__(self):
        self.widths = tuple(self.widths)  # JSON gives a list
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be one or more positive channel counts, got {self.widths}")
        if self.stem_stride < 0:
            raise ValueError(f"stem_stride must be >= 0 (0: image_size // 32), got {self.stem_stride}")
        if self.image_size < self.stride * 2 ** (len(self.widths) - 1):
            raise ValueError(f"image_size {self.image_size} is too small for {len(self.widths)} stages "
                             f"after a stride-{self.stride} first conv")

    @property
    def stride(self):
        return self.stem_stride or max(1, self.image_size // 32)


class Classifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        stages, channels = [], 3
        for k, width in enumerate(config.widths):
            stride = config.stride if k == 0 else 1
            stages.append(nn.Sequential(nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                                        nn.BatchNorm2d(width), nn.ReLU()))
            channels = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(channels, config.n_classes)

    @property
    def num_features(self):
        return self.config.widths[-1]

    def embed(self, x):
        """Images in [-1, 1] (B, 3, S, S) -> features (B, widths[-1])."""
        for k, stage in enumerate(self.stages):
            x = stage(x)
            if k < len(self.stages) - 1:
                x = F.max_pool2d(x, 2)
        return x.mean(dim=(2, 3))

    def forward(self, x):
        """Images in [-1, 1] (B, 3, S, S) -> logits (B, n_classes)."""
        return self.head(self.embed(x))

    @torch.no_grad()
    def predict(self, images):
        """uint8 images (N, 3, S, S) -> predicted classes (N,) int64, on the images' device."""
        return torch.cat([self(x).argmax(dim=1) for x in self._batches(images)])

    @torch.no_grad()
    def features(self, images):
        """uint8 images (N, 3, S, S) -> penultimate-layer features (N, widths[-1]) float32."""
        return torch.cat([self.embed(x).float() for x in self._batches(images)])

    def _batches(self, images):
        """uint8 images -> model-range batches on the model's device, in eval mode."""
        check_images(images, self.config.image_size)
        self.eval()
        device = self.head.weight.device
        for start in range(0, len(images), PREDICT_BATCH):
            yield to_model_range(images[start : start + PREDICT_BATCH].to(device))


def check_images(images, size):
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(f"expected uint8 images (N, 3, {size}, {size}), got {images.dtype} {tuple(images.shape)}")


def check_labels(labels, n_images, n_classes):
    if labels.dim() != 1 or len(labels) != n_images:
        raise ValueError(f"expected {n_images} labels (N,), got shape {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got {int(labels.min())}..{int(labels.max())}")


def train_classifier(images, labels, config: ClassifierConfig, steps=300, batch_size=64, lr=3e-3, seed=0,
                     device="cpu", progress=False):
    """uint8 images (N, 3, S, S) and int labels (N,) -> a trained Classifier in eval mode on `device`.

    Adam with a cosine decay to zero, random horizontal flips. The seed decides the initial weights,
    the batches and the flips (the global RNG is left as it was), so a run on the CPU repeats exactly.
    """
    check_images(images, config.image_size)
    labels = torch.as_tensor(labels, dtype=torch.long)
    check_labels(labels, len(images), config.n_classes)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(config).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    for _ in tqdm(range(steps), desc="classifier", disable=not progress):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = to_model_range(images[index])  # (B, 3, S, S)
        x = torch.where(flip[:, None, None, None], x.flip(3), x).to(device)
        loss = F.cross_entropy(model(x), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def save_classifier(model: Classifier, path, **extra):
    """Writes the weights and config as a safetensors checkpoint (kind 'classifier'), atomically."""
    save_checkpoint(path, model.state_dict(), CLASSIFIER_KIND, model.config, **extra)


def load_classifier(path):
    """A checkpoint file (or a directory holding model.safetensors) -> (Classifier in eval mode, extra)."""
    return load_model(path, CLASSIFIER_KIND, Classifier, ClassifierConfig)
