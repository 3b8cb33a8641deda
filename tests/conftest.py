"""Fixtures shared by the test files: one thread for tiny models, a folder of smooth images, and a
short VQ-VAE training run."""

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread and lose much when the cores are busy; runs in
    subprocesses (OMP_NUM_THREADS=1) and in this process then compute the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smooth_pixels():
    """40 smooth random 8x8 RGB images, uint8 (40, 8, 8, 3): colour gradients plus noise, so there
    is something to learn."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 8)
    images = [rng.uniform(0, 255, size=3) * ramp[:, None, None] + rng.normal(0, 8, size=(8, 8, 3)) for _ in range(40)]
    return np.stack(images).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_folder(smooth_pixels, tmp_path_factory):
    """The smooth images as an image folder of PNG files."""
    folder = tmp_path_factory.mktemp("images")
    for k, pixels in enumerate(smooth_pixels):
        Image.fromarray(pixels).save(folder / f"{k:03d}.png")
    return folder


@pytest.fixture(scope="session")
def fit_vqvae():
    """fit(model, images, lr, steps=60) -> the reconstruction loss of each of `steps` full-batch Adam
    steps on `images`, which train `model` in place."""

    def fit(model, images, lr, steps=60):
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            out = model(images)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses.append(out.reconstruction_loss.item())
        return losses

    return fit
