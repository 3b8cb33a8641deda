"""The `ood` benchmark: does a likelihood score tell held-out in-distribution crops from images of
other kinds? AUROC of each score (higher: more out of distribution) between the crops and each kind.

In distribution: crops of the built-in test photos (BuiltinPhotos' test split, photos no model
trained on). The other kinds, as many of each: uniform noise; other test crops flipped upside
down; other test crops colour-inverted (255 - v); crops of scikit-image's `camera` (a grayscale
photo not among BUILTIN_PHOTOS, as RGB), cut as BuiltinPhotos cuts its crops. Scores: the pixel
model's bits/dim; the pipeline's total bits of top and bottom codes, each level's bits per code
(the classes unknown: the uniform mixture over the priors' classes, pipelines.infer.scoring), and the
VQ-VAE's reconstruction MSE. AUROC is the exact rank statistic (torchmetrics' BinaryAUROC): 1 means
every image of the kind scores above every in-distribution crop, 0.5 chance, below 0.5 the kind
looks *more* likely than the real crops.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image
from torchmetrics.classification import BinaryAUROC

from bench.common import (Report, add_common_arguments, add_quick_argument, apply_defaults, log, machine_info,
                          machine_lines, recorded_path, results_record)
from pipelines.data.datasets import BuiltinPhotos, random_crops
from pipelines.device import make_runtime
from pipelines.infer.generation import Pipeline, load_pipeline
from pipelines.infer.scoring import MIXTURE, score_pipeline, score_pixels
from pipelines.store.checkpoint import load_pixelsnail
from prior import PixelSNAIL, PixelSNAILConfig, get_preset
from vqvae import VQVAE2, VQVAE2Config

IN_DISTRIBUTION = "held-out crops"
KINDS = ("uniform noise", "flipped upside down", "colour-inverted", "another photo (camera)")
QUICK_DEFAULTS = dict(images=8, batch_size=8, pixels=None, demo=None)
FULL_DEFAULTS = dict(images=400, batch_size=50, pixels="runs/demo-pixels", demo="runs/demo")


def image_sets(n, size, seed):
    """uint8 (n, 3, S, S) images of each kind, the in-distribution crops first."""
    crops = BuiltinPhotos("test", size, n_images=2 * n, seed=seed).images
    held_out, others = crops[:n], crops[n:]
    generator = torch.Generator().manual_seed(seed)
    camera = Image.fromarray(skimage.data.camera()).convert("RGB")
    rng = np.random.default_rng(seed)
    camera_crops, _ = random_crops([camera], n, size, rng)
    return {
        IN_DISTRIBUTION: held_out,
        "uniform noise": torch.randint(0, 256, held_out.shape, dtype=torch.uint8, generator=generator),
        "flipped upside down": others.flip(2),
        "colour-inverted": 255 - others,
        "another photo (camera)": camera_crops.contiguous(),
    }


def score_sets(score, sets, batch_size):
    """{kind: {score name: (n,) float64}} with `score(images)` -> BatchScores."""
    results = {}
    for kind, images in sets.items():
        columns = {}
        for batch in images.split(batch_size):
            scores = score(batch)
            named = {"bits/dim" if level.name == "pixels" else f"{level.name} bits/code": level.bits
                     for level in scores.levels}
            if len(scores.levels) > 1:
                named = {"top + bottom bits": sum(level.total_bits for level in scores.levels), **named}
            if scores.reconstruction_mse is not None:
                named["VQ-VAE reconstruction MSE"] = scores.reconstruction_mse
            for name, values in named.items():
                columns.setdefault(name, []).append(values.double().cpu())
        results[kind] = {name: torch.cat(parts) for name, parts in columns.items()}
        log(f"  {kind}: " + ", ".join(f"{name} {values.mean():.4g}" for name, values in results[kind].items()))
    return results


def aurocs(scores):
    """{score name: {kind: AUROC of the score, the kind against the in-distribution crops}}.

    BinaryAUROC takes scores outside [0, 1] for logits and squashes them with a sigmoid, which
    rounds large ones (thousands of bits) to 1 alike: it is given their ranks (ties kept tied),
    scaled into [0, 1], which the AUROC, a function of the order alone, cannot tell apart."""
    inside = scores[IN_DISTRIBUTION]
    table = {}
    for name, in_values in inside.items():
        table[name] = {}
        for kind in KINDS:
            ranks = torch.unique(torch.cat([in_values, scores[kind][name]]), return_inverse=True)[1].double()
            targets = torch.cat([torch.zeros(len(in_values)), torch.ones(len(scores[kind][name]))]).long()
            table[name][kind] = float(BinaryAUROC()(ranks / max(1.0, float(ranks.max())), targets))
    return table


def quick_models(seed):
    """Tiny random models (--quick): a pixel model on 8x8 images and a pipeline on 16x16 ones."""
    torch.manual_seed(seed)
    pixels = PixelSNAIL(get_preset("tiny").model).eval()
    vqvae = VQVAE2(VQVAE2Config(channels=8, res_channels=4, n_res_blocks=1, top_codes=16, bottom_codes=16, code_dim=4))
    top = PixelSNAIL(PixelSNAILConfig(shape=(2, 2), n_codes=16, n_classes=3, channels=8, n_blocks=1, n_res_blocks=1))
    bottom = PixelSNAIL(PixelSNAILConfig(shape=(4, 4), n_codes=16, n_classes=3, cond_codes=16, cond_shape=(2, 2),
                                         channels=8, n_blocks=1, n_res_blocks=1, attention=False))
    return pixels, Pipeline(vqvae.eval(), top.eval(), bottom.eval(), 16)


MODELS = {"pixels": "pixel model", "pipeline": "pipeline"}  # --models value: name in the results


def scorers(args, runtime):
    """{model: (image size, score(images) -> BatchScores)} of the models in --models."""
    if args.quick:
        pixel_model, pipeline = quick_models(args.seed)
    else:
        pixel_model = load_pixelsnail(args.pixels)[0] if "pixels" in args.models else None
        demo = Path(args.demo)
        pipeline = load_pipeline(demo / "vqvae", demo / "top", demo / "bottom") if "pipeline" in args.models else None
    jobs = {}
    if pixel_model is not None:
        model = pixel_model.to(runtime.device)
        jobs["pixel model"] = (model.config.shape[0], lambda images: score_pixels(model, images, None, runtime))
    if pipeline is not None:
        labels = MIXTURE if pipeline.n_classes else None
        on_device = pipeline.to(runtime)
        jobs["pipeline"] = (pipeline.image_size, lambda images: score_pipeline(on_device, images, labels, runtime))
    return {MODELS[name]: jobs[MODELS[name]] for name in MODELS if name in args.models}


def measure(args):
    """{model: {"image_size", "seconds", "aurocs", "means"}} for the models in --models."""
    results = {}
    for name, (size, score) in scorers(args, make_runtime(args.device, "fp32")).items():
        log(f"{name}: {args.images} images of each kind at {size}x{size}")
        start = time.perf_counter()
        scores = score_sets(score, image_sets(args.images, size, args.seed), args.batch_size)
        results[name] = {"image_size": size, "seconds": time.perf_counter() - start, "aurocs": aurocs(scores),
                         "means": {kind: {score_name: float(values.mean()) for score_name, values in by_score.items()}
                                   for kind, by_score in scores.items()}}
    return results


def run(args):
    """AUROC of likelihood scores between held-out in-distribution crops (BuiltinPhotos' test split)
    and four other kinds of image: uniform noise, test crops flipped upside down, colour-inverted
    test crops, and crops of scikit-image's camera photo (not among the training photos), --images
    of each. Models: the pixel-space model --pixels (default runs/demo-pixels, which `make
    demo-pixels` trains) scored by bits/dim, and the pipeline in --demo (default runs/demo, which
    `make demo` writes: vqvae/, top/, bottom/) scored by its codes' total bits, each level's bits per
    code (the class unknown: the uniform mixture over the priors' classes) and the VQ-VAE's
    reconstruction MSE. Everything in fp32 (pipelines.infer.scoring, as scripts/score.py). Writes ood.json
    and ood.md to --out. --quick: tiny random models on 8 images of each kind; the numbers mean nothing."""
    apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    models = measure(args)
    config = {"images_per_kind": args.images, "batch_size": args.batch_size, "seed": args.seed,
              "pixels": recorded_path(args.pixels), "demo": recorded_path(args.demo),
              "kinds": list(KINDS), "models": args.models}
    results = results_record("ood", info, args.quick, config, models=models)
    REPORT.publish(results, args.out)


def report(results):
    """(header, rows, notes): one row per model and score, the AUROC against each kind."""
    header = ("model", "score", *KINDS)
    rows = []
    for model, measured in results["models"].items():
        for score, by_kind in measured["aurocs"].items():
            rows.append((model, score, *(f"{by_kind[kind]:.3f}" for kind in KINDS)))
    c = results["config"]
    notes = [
        f"AUROC (torchmetrics BinaryAUROC, exact) of each score between {c['images_per_kind']} {IN_DISTRIBUTION} "
        "(BuiltinPhotos' test split: photos no model trained on) and as many images of each kind; 1: every image "
        "of the kind scores higher (less likely) than every crop, 0.5: chance, below 0.5: the kind looks more "
        "likely than the real crops",
    ]
    described = {"pixel model": f"the pixel model {c['pixels']}",
                 "pipeline": f"the pipeline {c['demo']} (classes unknown: the uniform mixture over the priors' classes)"}
    notes.append("models: " + "; ".join(described[model] for model in results["models"]))
    for model, measured in results["models"].items():
        means = measured["means"]
        scores = list(means[IN_DISTRIBUTION])
        notes.append(f"{model} ({measured['image_size']}x{measured['image_size']}, scored in "
                     f"{measured['seconds']:.0f} s), mean scores: " + "; ".join(
                         f"{kind}: " + ", ".join(f"{means[kind][score]:.4g}" for score in scores)
                         for kind in (IN_DISTRIBUTION, *KINDS)) + f" ({', '.join(scores)})")
    notes += machine_lines(results)
    return header, rows, notes


REPORT = Report("ood", "Out-of-distribution detection by likelihood: AUROC against held-out crops", report,
                quick="tiny random models")


def model_list(text):
    names = text.split(",")
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model {unknown[0]!r}: choose from {', '.join(MODELS)}")
    return names


def add_arguments(parser):
    full = FULL_DEFAULTS
    add_quick_argument(parser, QUICK_DEFAULTS)
    parser.add_argument("--images", type=int, help=f"images of each kind (default {full['images']})")
    parser.add_argument("--batch-size", type=int, help=f"images per batch (default {full['batch_size']})")
    parser.add_argument("--pixels", help=f"the pixel model's run (default {full['pixels']})")
    parser.add_argument("--demo", help=f"the pipeline's directory: vqvae/, top/, bottom/ (default {full['demo']})")
    parser.add_argument("--models", type=model_list, default=list(MODELS),
                        help=f"which models, a comma list of {', '.join(MODELS)} (default both)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    add_common_arguments(parser, "ood", seed_help="seed of the crops and the noise")
