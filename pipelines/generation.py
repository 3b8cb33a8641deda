"""Generation with the VQ-VAE-2 pipeline: sample top codes, then bottom codes given them, decode.

`load_pipeline` loads a VQ-VAE and its two priors and checks that they belong together: each
prior was trained on codes of this very VQ-VAE checkpoint (same file hash), on the right level,
with the grid shapes and codebook sizes the VQ-VAE produces, and both with the same classes.
"""

from dataclasses import dataclass

import torch

from pipelines.checkpoint import CheckpointError, load_pixelsnail, load_vqvae, resolve_checkpoint
from pipelines.codes import PriorProvenance, check_fits, file_sha256
from prior import PixelSNAIL
from vqvae import VQVAE2


@dataclass
class Pipeline:
    vqvae: VQVAE2
    top: PixelSNAIL
    bottom: PixelSNAIL
    image_size: int

    @property
    def n_classes(self):
        return self.top.config.n_classes

    def to(self, runtime):
        """The pipeline on the runtime's device, in eval mode, the VQ-VAE channels_last."""
        device = runtime.device
        return Pipeline(runtime.vqvae(self.vqvae), self.top.to(device).eval(), self.bottom.to(device).eval(),
                        self.image_size)


def load_pipeline(vqvae_path, top_path, bottom_path):
    """Loads and cross-checks the three checkpoints (run directories or files) -> Pipeline."""
    vqvae, vqvae_extra = load_vqvae(vqvae_path)
    vqvae_hash = file_sha256(resolve_checkpoint(vqvae_path))
    image_size = vqvae_extra.get("image_size")
    if not isinstance(image_size, int):
        raise CheckpointError(f"{vqvae_path} does not record the image size it was trained on: not a VQ-VAE run's checkpoint")
    priors = {}
    for level, path in (("top", top_path), ("bottom", bottom_path)):
        prior, extra = load_pixelsnail(path)
        if extra.get("level") != level:
            raise ValueError(f"{path} is not a {level} prior (its level: {extra.get('level', 'none, a pixel model')})")
        if PriorProvenance.from_extra(extra, path).vqvae_sha256 != vqvae_hash:
            raise ValueError(f"the {level} prior {path} was trained on codes of another VQ-VAE than {vqvae_path}")
        priors[level] = prior
    top_shape, bottom_shape = vqvae.code_shapes(image_size)
    for level, prior in priors.items():
        # what the VQ-VAE gives a prior of this level, with the top prior's classes
        fits = PriorProvenance(level, vqvae_hash, image_size, top_shape, bottom_shape, vqvae.config.top_codes,
                               vqvae.config.bottom_codes, priors["top"].config.n_classes)
        check_fits(prior.config, fits, f"the VQ-VAE {vqvae_path} (with the top prior's classes)")
    return Pipeline(vqvae, priors["top"], priors["bottom"], image_size)


@torch.no_grad()
def generate(pipeline, n, label=None, temperature=1.0, generator=None, progress=False):
    """n images (n, 3, S, S) in [-1, 1] with their top and bottom codes.

    `label` is an int (one class for all) or None; class-conditional priors need one.
    """
    if pipeline.n_classes and label is None:
        raise ValueError(f"the priors are class-conditional: give a label in [0, {pipeline.n_classes})")
    if not pipeline.n_classes and label is not None:
        raise ValueError(f"the priors are not class-conditional: give no label (got {label})")
    if label is not None and not 0 <= label < pipeline.n_classes:
        raise ValueError(f"label must lie in [0, {pipeline.n_classes}), got {label}")
    device = pipeline.top.background.device
    labels = None if label is None else torch.full((n,), label, dtype=torch.long, device=device)
    top_codes = pipeline.top.sample(n, labels, None, generator, temperature, progress=progress)
    bottom_codes = pipeline.bottom.sample(n, labels, top_codes, generator, temperature, progress=progress)
    return pipeline.vqvae.decode_codes(top_codes, bottom_codes), top_codes, bottom_codes
