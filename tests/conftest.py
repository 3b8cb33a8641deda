"""Fixtures shared by the test files: one thread for tiny models, a folder of smooth images, and a
short VQ-VAE training run,
and a tiny pipeline run directory."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.device import some_thread_flushes_denormals

# The scripts the tests start as processes import this checkout's packages, whichever checkout the
# environment has installed (a second worktree shares one .venv): python puts scripts/ first on
# their path, not the repository root.
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

# torch's intra-op threads start here, without the denormal flag: a training script run in this
# process (launch.run_in_process) would otherwise start them flushing, for every test after it.
assert not some_thread_flushes_denormals(), "the test process must start computing denormals as such"


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


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A pipeline's run directory as scripts/demo.py lays it out, tiny and untrained: two classes of
    16x16 images (images/train and images/test, reddish and bluish ramps), a random VQ-VAE (vqvae/),
    its code database (codes.lmdb) and random top and bottom priors that fit it (top/, bottom/)."""
    from pipelines.infer.extract import extract_with_vqvae
    from pipelines.store.checkpoint import CHECKPOINT_NAME, save_checkpoint
    from pipelines.store.codes import read_metadata
    from pipelines.store.provenance import PriorProvenance, prior_fields
    from prior import PixelSNAIL, PixelSNAILConfig
    from vqvae import VQVAE2, VQVAE2Config

    root = tmp_path_factory.mktemp("tiny_pipeline")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.5, 1, 16)[None, None, :, None]
    for split, n in (("train", 20), ("test", 8)):
        for label, colour in enumerate(([200, 40, 40], [40, 40, 200])):
            folder = root / "images" / split / f"class{label}"
            folder.mkdir(parents=True)
            pixels = np.array(colour) * ramp + rng.normal(0, 10, (n, 16, 16, 3))
            for k, image in enumerate(pixels.clip(0, 255).astype(np.uint8)):
                Image.fromarray(image).save(folder / f"{k}.png")
    torch.manual_seed(0)
    config = VQVAE2Config(channels=8, res_channels=4, n_res_blocks=1, top_codes=8, bottom_codes=8, code_dim=4)
    save_checkpoint(root / "vqvae" / CHECKPOINT_NAME, VQVAE2(config).state_dict(), "vqvae2", config, step=1,
                    image_size=16)
    extract_with_vqvae(root / "vqvae", str(root / "images"), root / "codes.lmdb")
    metadata = read_metadata(root / "codes.lmdb")
    small = dict(channels=8, n_blocks=1, n_res_blocks=1, kernel_size=2, key_channels=4, value_channels=4,
                 embed_channels=4, cond_channels=4, cond_res_blocks=1, dropout=0.0)
    for level in ("top", "bottom"):
        provenance = PriorProvenance.of_database(metadata, level)
        prior = PixelSNAILConfig(**prior_fields(provenance), **small, attention=level == "top")
        save_checkpoint(root / level / CHECKPOINT_NAME, PixelSNAIL(prior).state_dict(), "pixelsnail", prior, step=1,
                        **provenance.to_extra())
    return root


class Faults:
    """Faults injected into the code under test, each of which must fire.

    `inject(owner, name, make)` replaces owner.name by make(original, fired): the replacement
    calls fired() when it injects its fault. At the end of the test every injected fault must
    have fired: a patch of a name the code no longer calls (a module moved, a writer renamed)
    fails the test instead of letting it pass without testing anything."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.fired_counts = monkeypatch, {}

    def inject(self, owner, name, make):
        target = f"{getattr(owner, '__name__', owner)}.{name}"
        self.fired_counts[target] = 0

        def fired():
            self.fired_counts[target] += 1

        self.monkeypatch.setattr(owner, name, make(getattr(owner, name), fired))

    def unfired(self):
        return [target for target, count in self.fired_counts.items() if not count]


@pytest.fixture
def faults(monkeypatch):
    faults = Faults(monkeypatch)
    yield faults
    assert not faults.unfired(), f"injected faults that never fired (a stale patch target?): {faults.unfired()}"
