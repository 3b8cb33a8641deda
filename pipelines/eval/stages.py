"""Each stage's figures: bits per dimension (or per code) of a PixelSNAIL over a loader, which the
trainers report too, and the offline evaluation of the VQ-VAE and of a prior, each a flat dict of
named numbers that `pipelines.store.results.write_result` files under its stage.

- A prior on its code database: bits per code over the held-out records (every 20th, as the prior
  trainer holds them out) and over the training records, and the gap (held-out - train): a gap
  that grows while the training loss falls is overfitting. On another database of its VQ-VAE
  (another split, other images), every record is held out: one figure, no gap.
- A VQ-VAE on images (`evaluate_vqvae`, the one evaluator: the trainer's periodic evaluations and
  `evaluate.py vqvae` both run it): reconstruction MSE (images in [-1, 1]), the PSNR it gives
  (`psnr_db`) and SSIM (torchmetrics, images in [0, 1]) of the reconstructions the pipeline decodes
  (clamped to [-1, 1]), and per level the codebook usage (share of the codes used at least once over
  the images evaluated) and perplexity (exp of the entropy of their code frequencies).
"""

import itertools
import math
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader, Subset
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm.auto import tqdm

from pipelines.data.codes import code_splits
from pipelines.data.datasets import absolute_spec, image_inputs, to_model_range
from pipelines.store.checkpoint import load_pixelsnail
from pipelines.store.provenance import PriorProvenance, check_fits
from prior.modes import evaluating
from vqvae.quantizer import batch_statistics


def evaluate_prior(prior_path, codes_path, accelerator, batch_size=64, max_records=None):
    """A code-mode prior on a code database of its VQ-VAE -> {level, database (its absolute path),
    trained_on_database (whether it is the prior's own), heldout_bits_per_code, heldout_records}, and
    on its own database train_bits_per_code, train_records and gap_bits_per_code. On its own database
    the held-out records are every 20th, as the trainer holds them out; on another (the identity of
    its database that the prior stored says so) every record is held out: no train figure, no gap.
    `max_records`: at most this many records of each split (the first ones), None: all."""
    model, extra = load_pixelsnail(prior_path)
    if model.config.pixel_mode:
        raise ValueError(f"{prior_path} is a pixel-mode model: evaluate it with `evaluate.py pixels`")
    trained_on = PriorProvenance.from_extra(extra, prior_path)
    source = code_splits(codes_path, trained_on.level)
    provenance = source.provenance
    if provenance.vqvae_sha256 != trained_on.vqvae_sha256:
        raise ValueError(f"the {trained_on.level} prior {prior_path} was trained on codes of another VQ-VAE "
                         f"than the code database {codes_path}")
    check_fits(model.config, provenance, f"the code database {codes_path}")
    own = trained_on.same_database(provenance)
    splits = {"heldout": source.test_set, "train": source.train_set} if own else {"heldout": source.every_record}
    model = model.to(accelerator.device)
    result = {"level": trained_on.level, "database": absolute_spec(str(codes_path)), "trained_on_database": own}
    for name, dataset in splits.items():
        if max_records is not None:
            dataset = Subset(dataset, range(min(max_records, len(dataset))))
        loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size))
        result[f"{name}_bits_per_code"] = evaluate_bits(model, loader, accelerator, source.inputs, desc=name)
        result[f"{name}_records"] = len(dataset)
    if own:
        result["gap_bits_per_code"] = result["heldout_bits_per_code"] - result["train_bits_per_code"]
    return result


def psnr_db(mse):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2) from their mean squared
    error: the trainer's figure and evaluate_vqvae's."""
    return 10 * math.log10(4 / mse) if mse > 0 else math.inf


@torch.no_grad()
def evaluate_vqvae(model, loader, accelerator, max_batches=None, desc="test"):
    """A VQ-VAE over a loader of (uint8 images, labels) batches on the accelerator's device -> {mse,
    psnr_db, ssim, images, and per level (`top_usage`, ..., named by modelkit.level_names) usage,
    perplexity, codes (the codebook size)}: what the
    trainer logs at each evaluation and `evaluate.py vqvae` reports. The reconstructions are the
    pipeline's (codes decoded, clamped to [-1, 1]); every figure is over all the images evaluated,
    every process's share counted once. max_batches: each process's first batches only."""
    vqvae = accelerator.unwrap_model(model)
    levels = vqvae.config.level_names
    counts = {level: torch.zeros(size, dtype=torch.long, device=accelerator.device)
              for level, size in zip(levels, vqvae.config.codebook_sizes())}
    totals = {"mse": 0.0, "ssim": 0.0}
    n_images, n_batches = 0, len(loader) if max_batches is None else min(max_batches, len(loader))
    bar = tqdm(total=n_batches, desc=desc, leave=False, disable=not accelerator.is_main_process)
    with evaluating(vqvae), bar:
        for images, _ in itertools.islice(loader, n_batches):
            x = to_model_range(images).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
            with accelerator.autocast():
                codes = vqvae.encode(x)  # per level, top first: (B, S/8, S/8), (B, S/4, S/4) for two
                reconstruction = vqvae.decode_codes(*codes).float()  # (B, 3, S, S)
            x, reconstruction = x.contiguous(), reconstruction.contiguous()
            squared_error = (reconstruction - x).square().mean(dim=(1, 2, 3))  # (B,)
            similarity = structural_similarity_index_measure((reconstruction + 1) / 2, (x + 1) / 2, data_range=1.0,
                                                             reduction="none")  # (B,)
            squared_error, similarity, *codes = accelerator.gather_for_metrics((squared_error, similarity, *codes))
            totals["mse"] += squared_error.double().sum().item()
            totals["ssim"] += similarity.double().sum().item()
            n_images += len(squared_error)
            for level, level_codes in zip(levels, codes):
                counts[level] += torch.bincount(level_codes.flatten(), minlength=len(counts[level]))
            bar.update()
    result = {name: total / n_images for name, total in totals.items()}
    result.update(psnr_db=psnr_db(result["mse"]), images=n_images)
    for level in levels:
        perplexity, usage = batch_statistics(counts[level].float())
        result.update({f"{level}_usage": usage.item(), f"{level}_perplexity": perplexity.item(),
                       f"{level}_codes": len(counts[level])})
    return result


@torch.no_grad()
def evaluate_bits(model, loader, accelerator, inputs=image_inputs, max_batches=None, desc="test", autocast=True):
    """Mean bits per dimension (per code) over the loader's examples, all of them unless
    max_batches, every process's share counted once. autocast=False: no autocast of ours (a model
    that `accelerator.prepare` did not wrap then computes in fp32)."""
    total, count = 0.0, 0
    n_batches = len(loader) if max_batches is None else min(max_batches, len(loader))
    bar = tqdm(total=n_batches, desc=desc, leave=False, disable=not accelerator.is_main_process)
    with evaluating(model), bar:
        for batch in itertools.islice(loader, n_batches):
            with accelerator.autocast() if autocast else nullcontext():
                bits = model.nll(*inputs(batch))
            bits = accelerator.gather_for_metrics(bits)
            total += bits.double().sum().item()
            count += bits.numel()
            bar.update()
    return total / count
