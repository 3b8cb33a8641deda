"""The `guidance` benchmark: does classifier-free guidance make samples of the class asked for?

Trains a demo-like top and bottom prior pair with label dropout (the real trainer, on a copy of the
demo's VQ-VAE and code database), trains the small CNN classifier (pipelines.eval.classifier) on the
built-in training crops' classes (the photo each crop came from), reports its accuracy on held-out
crops of the same photos (fresh random crops, another seed) and on their VQ-VAE reconstructions
(what any decoded sample can reach at best), then samples every class at guidance 0 (the null
class: unconditional), 1 (plain conditional sampling), 2 and 4, and at top-p 0.9 (guidance 1), and
reports the fraction of samples the classifier puts in the class asked for. Sample i of a setting
draws from a generator seeded by (seed, i), the same in every setting.
"""

import math
import shutil
from pathlib import Path

import torch

from bench.common import (ROOT, Report, add_out_argument, add_quick_argument, apply_defaults, load_average, log,
                          machine_info, machine_lines, recorded_path)
from pipelines.data.datasets import BuiltinPhotos, to_model_range, to_uint8
from pipelines.eval.classifier import ClassifierConfig, train_classifier
from pipelines.infer.generation import generate, load_pipeline, sample_keys
from pipelines.store.run_files import has_state
from pipelines.train import priors
from prior.drawing import Drawing

SETTINGS = {
    "guidance 0 (unconditional)": Drawing(guidance=0.0),
    "guidance 1 (conditional)": Drawing(),
    "guidance 2": Drawing(guidance=2.0),
    "guidance 4": Drawing(guidance=4.0),
    "top-p 0.9": Drawing(top_p=0.9),
}
FULL_DEFAULTS = dict(minutes=12.0, per_class=40, classifier_steps=1500, held_out=1200,
                     demo=str(ROOT / "runs" / "demo"), work=str(ROOT / "runs" / "guidance"))
QUICK_DEFAULTS = dict(minutes=0.1, per_class=2, classifier_steps=20, held_out=60)
LABEL_DROPOUT = 0.1
PRIOR_SHARE = {"top": 0.4, "bottom": 0.6}  # of --minutes, as the demo splits its priors' time
BATCH = 24


def train_priors(work, minutes, seed):
    """The top and bottom priors with label dropout, resumed when the work directory holds them;
    -> {level: validation bits per code}."""
    bits = {}
    for level in ("top", "bottom"):
        log(f"{level} prior with label dropout {LABEL_DROPOUT}, {PRIOR_SHARE[level] * minutes:.1f} min")
        bits[level] = priors.train(priors.PriorTrainConfig(
            codes=str(work / "codes.lmdb"), level=level, out=str(work / level), preset=f"cpu-{level}",
            steps=100_000, max_minutes=PRIOR_SHARE[level] * minutes, eval_every=100_000, checkpoint_every=200,
            label_dropout=LABEL_DROPOUT, seed=seed, resume=has_state(work / level)))
    return bits


def copy_demo(demo, work):
    """The demo's VQ-VAE and code database, copied (the demo's directory is only read)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "vqvae").exists():
        shutil.copytree(demo / "vqvae", work / "vqvae")
    if not (work / "codes.lmdb").exists():
        shutil.copytree(demo / "codes.lmdb", work / "codes.lmdb")


def accuracy(classifier, images, labels):
    return (classifier.predict(images) == labels).float().mean().item()


@torch.no_grad()
def reconstructed(vqvae, images):
    """uint8 images -> their VQ-VAE reconstructions, uint8."""
    return torch.cat([to_uint8(vqvae.decode_codes(*vqvae.encode(to_model_range(batch))))
                      for batch in images.split(64)])


def sample_setting(pipeline, drawing, labels, seed):
    """Samples of `labels` (one each) under `drawing` -> uint8 images (N, 3, S, S)."""
    images = []
    for start in range(0, len(labels), BATCH):
        indices = range(start, min(start + BATCH, len(labels)))
        batch, _, _ = generate(pipeline, len(indices), [labels[i] for i in indices], drawing,
                               sample_keys(seed, indices, "cpu"))
        images.append(to_uint8(batch))
    return torch.cat(images)


def wilson(successes, n, z=1.96):
    """The 95% Wilson score interval of a binomial proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def run(args):
    """Trains a top and bottom prior with label dropout 0.1 on a copy of --demo's VQ-VAE and codes
    (in --work, resumed there), a classifier on the built-in crops, and measures the fraction of
    samples classified as the class asked for at guidance 0, 1, 2, 4 and at top-p 0.9. Writes
    guidance.json and guidance.md to --out."""
    apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    demo, work = Path(args.demo), Path(args.work)
    if not (demo / "vqvae").exists() or not (demo / "codes.lmdb").exists():
        raise SystemExit(f"error: {demo} holds no vqvae/ and codes.lmdb: run `make demo` or pass --demo")
    info = machine_info()
    copy_demo(demo, work)
    prior_bits = train_priors(work, args.minutes, args.seed)
    pipeline = load_pipeline(work / "vqvae", work / "top", work / "bottom")
    size, n_classes = pipeline.image_size, pipeline.n_classes

    log("classifier on the built-in training crops")
    train_set = BuiltinPhotos("train", size)
    classifier = train_classifier(train_set.images, train_set.labels, ClassifierConfig(n_classes, size),
                                  steps=args.classifier_steps, seed=args.seed, progress=True)
    held_out = BuiltinPhotos("train", size, n_images=args.held_out, seed=args.seed + 1)
    real = {"held-out crops": accuracy(classifier, held_out.images, held_out.labels),
            "their VQ-VAE reconstructions": accuracy(classifier, reconstructed(pipeline.vqvae, held_out.images),
                                                     held_out.labels)}

    classes = sorted(set(train_set.labels.tolist()))  # the photos the priors saw
    labels = [label for label in classes for _ in range(args.per_class)]
    settings = {}
    for name, drawing in SETTINGS.items():
        log(f"{len(labels)} samples, {name}")
        predicted = classifier.predict(sample_setting(pipeline, drawing, labels, args.seed))
        hits = predicted == torch.tensor(labels)
        settings[name] = {"drawing": vars(drawing), "samples": len(labels), "as_asked": int(hits.sum()),
                          "per_class": {str(c): float(hits[torch.tensor(labels) == c].float().mean()) for c in classes}}
    results = {
        "benchmark": "guidance", **info, "load_average_after": load_average(),
        "config": {"demo": recorded_path(demo), "work": recorded_path(work), "minutes": args.minutes,
                   "label_dropout": LABEL_DROPOUT, "per_class": args.per_class, "classes": classes,
                   "classifier_steps": args.classifier_steps, "held_out": args.held_out, "image_size": size,
                   "seed": args.seed},
        "prior_validation_bits": prior_bits, "classifier_accuracy": real, "settings": settings,
    }
    REPORT.publish(results, args.out)


def add_arguments(parser):
    full = FULL_DEFAULTS
    add_quick_argument(parser, QUICK_DEFAULTS)
    parser.add_argument("--demo", help="the demo's directory: vqvae/ and codes.lmdb are copied (default "
                        f"{recorded_path(full['demo'])})")
    parser.add_argument("--work", help="directory for the copies and the priors; resumed (default "
                        f"{recorded_path(full['work'])})")
    parser.add_argument("--minutes", type=float, help=f"training time of the two priors together (default {full['minutes']})")
    parser.add_argument("--per-class", type=int, help=f"samples of each class per setting (default {full['per_class']})")
    parser.add_argument("--classifier-steps", type=int, help=f"classifier training steps (default {full['classifier_steps']})")
    parser.add_argument("--held-out", type=int, help=f"held-out crops for the accuracy (default {full['held_out']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the priors, classifier and samples (default 0)")
    add_out_argument(parser, "guidance.json and guidance.md")


# -- output -----------------------------------------------------------------------------------

HEADER = ("sampling", "samples", "classified as the class asked for", "95% interval")


def rows(results):
    out = []
    for name, setting in results["settings"].items():
        low, high = wilson(setting["as_asked"], setting["samples"])
        out.append((name, str(setting["samples"]), f"{setting['as_asked'] / setting['samples']:.1%}",
                    f"{low:.1%} - {high:.1%}"))
    return out


def summary_lines(results):
    c, real = results["config"], results["classifier_accuracy"]
    chance = 1 / len(c["classes"])
    return [
        f"classifier accuracy: {real['held-out crops']:.1%} on {c['held_out']} held-out crops of the training "
        f"photos, {real['their VQ-VAE reconstructions']:.1%} on their VQ-VAE reconstructions (chance {chance:.1%}, "
        f"{len(c['classes'])} classes)",
        f"priors: cpu-top and cpu-bottom with label dropout {c['label_dropout']}, {c['minutes']} min of training "
        f"together on a copy of {c['demo']}'s codes; validation bits/code: top "
        f"{results['prior_validation_bits']['top']:.4f}, bottom {results['prior_validation_bits']['bottom']:.4f}",
        f"{c['per_class']} samples of each class per setting, {c['image_size']}x{c['image_size']}, sample i seeded "
        f"by ({c['seed']}, i) in every setting; guidance 0 draws from the null class's logits; top-p at guidance 1",
        *machine_lines(results),
    ]


REPORT = Report("guidance", "Guidance benchmark: samples classified as the class asked for",
                lambda results: (HEADER, rows(results), summary_lines(results)))
