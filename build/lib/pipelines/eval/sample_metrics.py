"""How good a pipeline's class-conditional samples are, measured offline.

- Classification Accuracy Score (CAS; Ravuri and Vinyals 2019): the small classifier of
  pipelines/eval/classifier.py trained on the samples and their classes, tested on real held-out images.
  The ceiling: the same classifier trained on as many real training images per class.
- Local FID / KID: torchmetrics' FrechetInceptionDistance and KernelInceptionDistance with the
  real-trained classifier's penultimate layer as the feature extractor, samples against real
  held-out images. The figure beside it, real training images against the same held-out images,
  is what a generator that reproduced its training data would score. These numbers live in a
  feature space trained here on this data: they compare samples of the same data with each other,
  never with an Inception FID from a paper.
- Inception FID, when the user brings the Inception weights (nothing is downloaded): torchmetrics'
  FID with torch-fidelity's FeatureExtractorInceptionV3 loaded from that file.
"""

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from pipelines.data.datasets import BuiltinPhotos, load_dataset
from pipelines.errors import one_line
from pipelines.eval.classifier import ClassifierConfig, train_classifier
from pipelines.infer.extract import dataset_labels
from pipelines.infer.generation import SampleJob, make_samples
from pipelines.store import samples as sample_dir
from prior.drawing import Drawing

LOCAL_FID = "local FID (classifier features)"
LOCAL_KID = "local KID (classifier features)"
INCEPTION_SOURCE = (
    "the FID Inception v3 weights, pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
    "(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth) "
    "or torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torchmetrics' default, lowered to the smaller set's size when that is smaller


@dataclass
class LabelledImages:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self):
        return len(self.images)


class ClassifierFeatures(nn.Module):
    """A classifier's penultimate layer as torchmetrics' custom feature extractor: uint8 images
    (N, 3, S, S) -> (N, F) features. `num_features` spares torchmetrics a trial forward."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images):
        return self.classifier.features(images)


def per_class(dataset, n_classes, n, generator, skip=0):
    """`n` images of each class 0..n_classes-1 from a dataset of pipelines.data.datasets (the images chosen at
    random, after the first `skip` of each class's random order) -> LabelledImages. Refuses when a
    class has fewer."""
    labels = dataset_labels(dataset)
    chosen = []
    for label in range(n_classes):
        indices = torch.nonzero(labels == label).flatten()
        if len(indices) < skip + n:
            raise ValueError(f"the real data has {len(indices)} images of class {label}, {skip + n} needed: "
                             "lower the samples per class")
        chosen += indices[torch.randperm(len(indices), generator=generator)][skip : skip + n].tolist()
    images = torch.stack([dataset[i][0] for i in chosen])  # (N, 3, S, S) uint8
    return LabelledImages(images, labels[chosen])


def real_images(data, size, n_classes, n, seed=0):
    """Real images of the samples' classes, n per class -> (two disjoint training sets, held-out set).

    Held out: the test split. The built-in photos hold out two photos of their own classes, so
    their held-out set is fresh crops (another seed) of the training photos instead: crops that may
    overlap the training crops' areas, a weaker test than unseen photos.
    """
    generator = torch.Generator().manual_seed(seed)
    train = load_dataset(data, "train", size)
    first = per_class(train, n_classes, n, generator)
    # the same seed draws the same order per class: the second set is the next n images of it
    second = per_class(train, n_classes, n, torch.Generator().manual_seed(seed), skip=n)
    if data == "builtin":
        # random photos per crop: 20 more per class than 3n, so that small n, too, finds n of each
        test = BuiltinPhotos("train", size, n_images=n_classes * (3 * n + 20), seed=seed + 1)
    else:
        test = load_dataset(data, "test", size)
    return first, second, per_class(test, n_classes, n, generator)


def accuracy(classifier, real: LabelledImages):
    return (classifier.predict(real.images).cpu() == real.labels).double().mean().item()


def local_fid_kid(classifier, real: LabelledImages, other: LabelledImages, seed=0):
    """(FID, KID mean, KID std) of `other` against `real` in the classifier's feature space, on the
    classifier's device."""
    features = ClassifierFeatures(classifier)
    fid = FrechetInceptionDistance(feature=features, normalize=False)
    subset_size = min(KID_SUBSET_SIZE, len(real), len(other))
    with warnings.catch_warnings():  # that it keeps every feature: a few MB here
        warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all extracted features")
        kid = KernelInceptionDistance(feature=features, subsets=KID_SUBSETS, subset_size=subset_size, normalize=False)
    for metric in (fid, kid):
        metric.to(classifier.head.weight.device)
        metric.update(real.images, real=True)
        metric.update(other.images, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID's random subsets
        kid_mean, kid_std = kid.compute()
    return fid.compute().item(), kid_mean.item(), kid_std.item()


def evaluate_samples(samples: LabelledImages, real_train, real_other, real_test, n_classes, steps=300, seed=0,
                     device="cpu", inception=None):
    """CAS with its ceiling, local FID / KID of the samples and of real training images, and with
    `inception` (a FrechetInceptionDistance) the Inception FID of both -> a flat dict."""
    config = ClassifierConfig(n_classes=n_classes, image_size=samples.images.shape[-1])
    on_samples, on_real = (train_classifier(images.images, images.labels, config, steps=steps, seed=seed,
                                            device=device, progress=True) for images in (samples, real_train))
    result = {"samples": len(samples), "classes": n_classes, "real_heldout": len(real_test),
              "cas": accuracy(on_samples, real_test), "cas_real_ceiling": accuracy(on_real, real_test)}
    for name, images in (("samples", samples), ("real", real_other)):
        fid, kid_mean, kid_std = local_fid_kid(on_real, real_test, images, seed)
        result.update({f"local_fid_{name}": fid, f"local_kid_{name}": kid_mean, f"local_kid_std_{name}": kid_std})
        if inception is not None:
            result[f"inception_fid_{name}"] = inception_fid(inception.to(device), real_test, images)
    return result


# -- Inception FID -----------------------------------------------------------------------------------


def inception_fid_metric(weights_path):
    """torchmetrics' FID on Inception v3's 2048 pool features, the network loaded from the user's
    weights file; refuses in one line where the file is missing, is not a plain state dict, or
    torch-fidelity (whose network it is) is not installed."""
    path = Path(weights_path)
    if not path.is_file():
        raise ValueError(f"--inception-weights {path}: no such file; bring {INCEPTION_SOURCE}; nothing is downloaded")
    try:  # never unpickle: weights_only refuses any object but tensors and plain containers
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with code, a zip of something else, a truncated file
        raise ValueError(f"--inception-weights {path} is not a weights-only torch file ({one_line(error, 200)})") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(fc, torch.Tensor) or tuple(fc.shape) != (1008, 2048):
        raise ValueError(f"--inception-weights {path} is not the FID Inception network (no fc.weight of shape "
                         f"(1008, 2048)); bring {INCEPTION_SOURCE}")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ValueError("Inception FID needs torch-fidelity (pip install torch-fidelity), whose Inception v3 "
                         "torchmetrics loads these weights into")
    try:  # torch-fidelity loads the file again with torch.load's default: weights-only from torch 2.6 on (our floor)
        return FrechetInceptionDistance(feature=2048, normalize=False, feature_extractor_weights_path=str(path))
    except RuntimeError as error:  # load_state_dict: missing or unexpected keys, other shapes
        raise ValueError(f"--inception-weights {path} does not fit torch-fidelity's Inception v3 "
                         f"({one_line(error, 200)})") from None


def inception_fid(metric, real: LabelledImages, other: LabelledImages, batch_size=64):
    metric.reset()
    for images, real_flag in ((real.images, True), (other.images, False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start : start + batch_size], real=real_flag)
    return metric.compute().item()


# -- the samples -------------------------------------------------------------------------------------


def load_samples(path):
    """scripts/sample.py --out-dir's samples.npz (or that directory) -> LabelledImages; refuses
    unconditional samples, which CAS cannot use."""
    path = Path(path)
    path = path / sample_dir.SAMPLES_FILE if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"samples not found: {path} (expected the samples.npz that sample.py --out-dir writes)")
    try:
        arrays = sample_dir.load(path)
        images, labels = torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"])
    except Exception as error:  # not a zip, not npy, a missing array: all mean "not sample.py's file"
        raise ValueError(f"{path} is not a samples.npz of sample.py ({one_line(error, 200)})") from None
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3 or labels.shape != (len(images),):
        raise ValueError(f"{path} does not hold uint8 images (N, S, S, 3) with N labels")
    if len(labels) == 0 or labels.min() < 0:
        raise ValueError(f"{path} holds unconditional samples: CAS needs class-conditional ones")
    return LabelledImages(rearrange(images, "n h w c -> n c h w").contiguous(), labels.long())


def draw_samples(pipeline, runtime, per_class, seed=0, batch_size=16, drawing=Drawing()):
    """`per_class` samples of every class of a class-conditional pipeline, drawn with `drawing`
    (prior.drawing) -> LabelledImages (on the CPU)."""
    if pipeline.n_classes < 2:
        raise ValueError("the priors are not class-conditional: CAS needs class-conditional samples")
    job = SampleJob(tuple(range(pipeline.n_classes)), per_class, seed, drawing)
    batches = []
    make_samples(pipeline, runtime, job, list(range(job.total)), batch_size,
                 lambda indices, labels, images, *codes: batches.append((labels, images)))
    images = rearrange(torch.cat([images for _, images in batches]), "n h w c -> n c h w").contiguous()
    return LabelledImages(images, torch.tensor([label for labels, _ in batches for label in labels]))
