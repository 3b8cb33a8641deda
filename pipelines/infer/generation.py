"""Generation with the VQ-VAE-2 pipeline: sample top codes, then each level below given the one above
it (two levels: the bottom codes given the top ones), decode.

A sampling job (`SampleJob`, `make_samples`) makes many samples in batches, on several processes:
sample i draws from per-sample keys of (seed, i) alone (prior.noise), so the same seed gives the
same samples whatever the batch size and the number of processes (bitwise in fp32 on the CPU; on a
GPU a kernel chosen per batch size may flip a code at a near tie).

`load_pipeline` loads a VQ-VAE and one prior per level (top first) and checks that they belong
together: each prior was trained on codes of this very VQ-VAE checkpoint (same file hash), on the
right level of a database with as many levels, with the grid shapes and codebook sizes the VQ-VAE
produces, and all with the top prior's classes.
"""

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from modelkit import level_names
from pipelines.data.datasets import to_uint8
from pipelines.store.checkpoint import CheckpointError, load_pixelsnail, load_vqvae, resolve_checkpoint
from pipelines.store.codes import file_sha256
from pipelines.store.provenance import PriorProvenance, check_fits
from prior import PixelSNAIL
from prior.drawing import Drawing
from prior.noise import SampleKeys, at_level
from prior.sampling import IncrementalPixelSNAIL
from vqvae import VQVAE2


@dataclass
class Pipeline:
    vqvae: VQVAE2
    top: PixelSNAIL
    bottom: PixelSNAIL
    image_size: int
    middle: tuple = ()  # the priors between the top and the bottom, top first (3 levels and more)

    @property
    def priors(self) -> tuple:
        """One prior per level, top first."""
        return (self.top, *self.middle, self.bottom)

    @property
    def levels(self) -> tuple[str, ...]:
        """The levels' names, top first (modelkit.level_names): top, bottom for two levels."""
        return level_names(len(self.priors))

    @property
    def by_level(self) -> dict:
        """{level name: its prior}, top first."""
        return dict(zip(self.levels, self.priors))

    @property
    def n_classes(self):
        return self.top.config.n_classes

    def to(self, runtime):
        """The pipeline on the runtime's device, in eval mode, the VQ-VAE channels_last."""
        top, *middle, bottom = (prior.to(runtime.device).eval() for prior in self.priors)
        return Pipeline(runtime.vqvae(self.vqvae), top, bottom, self.image_size, tuple(middle))


def load_pipeline(vqvae_path, *prior_paths):
    """Loads and cross-checks a VQ-VAE and one prior per level, top first (run directories or
    checkpoint files) -> Pipeline. Refuses, in one line, a list of the wrong length, a prior at
    another level (a list out of order) or of another VQ-VAE, and one that does not fit its grid."""
    vqvae, vqvae_extra = load_vqvae(vqvae_path)
    vqvae_hash = file_sha256(resolve_checkpoint(vqvae_path))
    image_size = vqvae_extra.get("image_size")
    if not isinstance(image_size, int):
        raise CheckpointError(f"{vqvae_path} does not record the image size it was trained on: not a VQ-VAE run's checkpoint")
    names = vqvae.config.level_names
    if len(prior_paths) != len(names):
        raise ValueError(f"the VQ-VAE {vqvae_path} has {len(names)} levels ({', '.join(names)}): give one prior per "
                         f"level, top first, not {len(prior_paths)}")
    priors = [load_prior(path, level, len(names), vqvae_hash, vqvae_path) for level, path in zip(names, prior_paths)]
    (top_shape, *inner_shapes, bottom_shape) = vqvae.code_shapes(image_size)
    (top_codes, *inner_codes, bottom_codes) = vqvae.config.codebook_sizes()
    for level, prior in zip(names, priors):
        # what the VQ-VAE gives a prior of this level, with the top prior's classes
        fits = PriorProvenance(level, vqvae_hash, image_size, top_shape, bottom_shape, top_codes, bottom_codes,
                               priors[0].config.n_classes, inner=tuple(zip(inner_shapes, inner_codes)))
        check_fits(prior.config, fits, f"the VQ-VAE {vqvae_path} (with the top prior's classes)")
    top, *middle, bottom = priors
    return Pipeline(vqvae, top, bottom, image_size, tuple(middle))


def load_prior(path, level, n_levels, vqvae_hash, vqvae_path):
    """The prior at `path`, refused unless trained at `level` of an `n_levels`-level database of the
    VQ-VAE whose file hash is `vqvae_hash`."""
    prior, extra = load_pixelsnail(path)
    if extra.get("level") is None:
        raise ValueError(f"{path} is not a {level} prior (its level: none, a pixel model)")
    provenance = PriorProvenance.from_extra(extra, path)
    if provenance.levels != n_levels:
        raise ValueError(f"{path} is not a {level} prior (its level: {provenance.level} of {provenance.levels} "
                         f"levels; the VQ-VAE has {n_levels})")
    if provenance.level != level:
        raise ValueError(f"{path} is not a {level} prior (its level: {provenance.level}): give the priors top first "
                         f"({', '.join(level_names(n_levels))})")
    if provenance.vqvae_sha256 != vqvae_hash:
        raise ValueError(f"the {level} prior {path} was trained on codes of another VQ-VAE than {vqvae_path}")
    return prior


def sample_seed(seed, index):
    """The seed of a torch generator for sample `index` (complete.py: one per image's completions)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little")


def sample_generators(seed, indices, device):
    """One torch generator per index, seeded from (seed, index)."""
    return [torch.Generator(device).manual_seed(sample_seed(seed, int(index))) for index in indices]


def sample_keys(seed, indices, device):
    """The per-sample keys of samples `indices` (prior.noise): sample i's draws depend on (seed, i)
    alone, not on the batch it is in, nor the process that makes it."""
    return SampleKeys.of(seed, indices, device)


DECODE_CHUNK = 32  # samples decoded at once: the decoder's activations at 256x256 dwarf the priors' caches


@dataclass
class Known:
    """Codes known before sampling, as completion keeps them, one entry per level, top first: each
    level's codes (n, h, w) and how many of their first raster positions are kept."""

    codes: tuple
    kept: tuple

    def prefix(self, index):
        """The sampler's prefix options for level `index` (0: the top)."""
        return {"prefix": self.codes[index], "kept": self.kept[index]}


@torch.no_grad()
def generate(pipeline, n, label=None, drawing=Drawing(), generator=None, progress=False, known=None, capture=False):
    """n images (n, 3, S, S) in [-1, 1], then the codes of every level, top first: (images, top codes,
    bottom codes) for two levels. Each level is drawn given the codes of the level above it.

    `label`: one class for all (an int), one per sample (a list of n), or None; class-conditional
    priors need one. `drawing`: temperature, top-k, top-p and guidance of every prior
    (prior.drawing). `generator`: a torch.Generator for the whole batch, or per-sample keys
    (`sample_keys`), whose draws then depend on each sample alone. `progress`: True shows a bar over
    positions; a callable is called after each level with the share of the positions it drew.
    `known`: codes to keep (Known); sampling starts after them at each level. `capture`: each
    level's steps replayed as CUDA graphs (prior.sampling.CachedSteps; CUDA and per-sample keys).
    """
    labels = check_labels(pipeline, n, label)
    device = pipeline.top.background.device
    labels = None if labels is None else torch.tensor(labels, dtype=torch.long, device=device)
    bars = progress is True
    options = {**asdict(drawing), **({"capture": True} if capture else {})}  # the cached sampler's options

    codes = []  # each level's (n, h, w), top first
    levels = pipeline.by_level
    for index, (level, prior) in enumerate(levels.items()):
        above = codes[-1] if codes else None  # the top prior has no codes to condition on
        kept = {} if known is None else known.prefix(index)
        codes.append(prior.sample(n, labels, above, at_level(generator, level), progress=bars, **options, **kept))
        if callable(progress) and index < len(levels) - 1:  # the last level's share once decoded
            progress(level_share(pipeline, level))
    images = torch.cat([pipeline.vqvae.decode_codes(*chunks) for chunks in
                        zip(*(level_codes.split(DECODE_CHUNK) for level_codes in codes))])
    if callable(progress):
        progress(level_share(pipeline, pipeline.levels[-1]))
    return images, *codes


def check_drawing(pipeline, drawing):
    """Refuses sampling controls a prior of the pipeline cannot take (guidance without label dropout)."""
    for level, prior in pipeline.by_level.items():
        try:
            drawing.check(prior.config)
        except ValueError as error:
            raise ValueError(f"the {level} prior: {error}") from None


def level_share(pipeline, level):
    """The share of a sample's positions that `level` draws."""
    sizes = {name: math.prod(prior.config.shape) for name, prior in pipeline.by_level.items()}
    return sizes[level] / sum(sizes.values())


def check_labels(pipeline, n, label):
    """-> a list of n labels, or None for unconditional priors; refuses labels that do not fit."""
    check_labels_given(label, pipeline.n_classes)
    if label is None:
        return None
    labels = [label] * n if isinstance(label, int) else [int(value) for value in label]
    if len(labels) != n:
        raise ValueError(f"expected {n} labels, got {len(labels)}")
    for value in labels:
        check_class(value, pipeline.n_classes)
    return labels


@dataclass(frozen=True)
class SampleJob:
    """What decides the samples: sample i has class labels[i // per_label] (None for unconditional
    priors) and draws from the keys of (seed, i) (`sample_keys`), with the sampling controls `drawing`."""

    labels: tuple
    per_label: int
    seed: int
    drawing: Drawing = Drawing()
    capture: bool = False  # how the steps run (CUDA graphs), not what they draw: not part of a job's record

    @property
    def total(self):
        return len(self.labels) * self.per_label

    def labels_of(self, indices):
        """The labels of samples `indices`, or None for unconditional priors."""
        return None if self.labels == (None,) else [self.labels[i // self.per_label] for i in indices]


# -- the one --label grammar: each script takes some of its forms -------------------------------

ALL, DATA, MIXTURE = "all", "data", "mixture"
LABEL_GRAMMAR = {  # form: (its name, what it means); a class and a comma list are numbers, the others words
    "class": ("a class", "3"),
    "list": ("a comma list of classes", "3,7,9"),
    ALL: ("all", "every class"),
    DATA: ("data", "each image's class in its dataset"),
    MIXTURE: ("mixture", "the class unknown: the uniform mixture of the model's classes"),
}


def label_forms(forms, n_classes=None, explained=False):
    """The label forms `forms` in words, as --help (`explained`) and refusals name them: 'a class, a
    comma list of classes or all', with the range of a class once the model's n_classes is known."""
    names = []
    for form in forms:
        name, meaning = LABEL_GRAMMAR[form]
        name += f" in [0, {n_classes})" if form == "class" and n_classes is not None else ""
        names.append(f"{name} ({meaning})" if explained else name)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def parse_label(spec, forms, n_classes=None):
    """--label as given, in one of `forms` (keys of LABEL_GRAMMAR) -> a class (int), classes (a tuple,
    from a comma list, or from all once n_classes is known), ALL, DATA, MIXTURE, or None where none
    is given. Refuses another form, and classes outside [0, n_classes) once n_classes is known:
    without it, a script refuses a malformed --label before it loads any model."""
    if spec is None:
        return None
    if spec in forms and spec in (ALL, DATA, MIXTURE):
        return tuple(range(n_classes)) if spec == ALL and n_classes is not None else spec
    try:
        classes = tuple(int(part) for part in spec.split(","))
    except ValueError:
        classes = ()
    if not classes or ("class" if len(classes) == 1 else "list") not in forms:
        raise ValueError(f"--label must be {label_forms(forms, n_classes)}, got {spec!r}")
    for label in classes if n_classes is not None else ():
        check_class(label, n_classes)
    return classes[0] if len(classes) == 1 else classes


def read_label(spec, forms, n_classes, model_is="the priors are"):
    """--label for a model of `n_classes` classes (0: unconditional) -> None for an unconditional
    model, else parse_label's answer; refuses a label missing, or given to an unconditional model."""
    check_labels_given(spec, n_classes, model_is, forms)
    return parse_label(spec, forms, n_classes)


def check_class(label, n_classes):
    if not 0 <= label < n_classes:
        raise ValueError(f"--label must lie in [0, {n_classes}), got {label}")


def check_labels_given(given, n_classes, model_is="the priors are", forms=None):
    """Refuses a missing label for a class-conditional model and one given to another; `forms`:
    --label's, named in the advice."""
    if n_classes and given is None:
        options = f" (--label: {label_forms(forms)})" if forms else ""
        raise ValueError(f"{model_is} class-conditional: give a label in [0, {n_classes}){options}")
    if not n_classes and given is not None:
        raise ValueError(f"{model_is} not class-conditional: give no label (got {given})")


def cache_bytes_per_sample(priors, runtime, drawing):
    """{level: the bytes the cached sampler holds per sample} of `priors` ({level: prior}, as
    Pipeline.by_level gives them): the caches' growth from a batch of 1 to a batch of 2, measured on
    the tensors they allocate (rows of every conv, keys and values, the rows' parts), twice under
    guidance. The levels run one after the other: the largest one is what a batch needs."""
    per_level = {}
    for level, model in priors.items():
        sizes = []
        with torch.no_grad(), runtime.autocast():
            for batch in (1, 2):
                label = None if not model.config.n_classes else torch.zeros(batch, dtype=torch.long, device=runtime.device)
                cond = (None if model.config.cond_codes is None else
                        torch.zeros(batch, *model.config.cond_shape, dtype=torch.long, device=runtime.device))
                network = IncrementalPixelSNAIL(model, batch, model.condition(batch, label, cond))
                network.output_at(0, 0)  # makes the rows' parts
                sizes.append(tensor_bytes(network))
        per_level[level] = (sizes[1] - sizes[0]) * (2 if drawing.guided else 1)
    return per_level


def tensor_bytes(root):
    """Bytes of every distinct tensor storage reachable from `root` through attributes and lists."""
    seen, storages, todo = set(), {}, [root]
    while todo:
        item = todo.pop()
        if isinstance(item, Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, torch.nn.Module) and id(item) not in seen:
            seen.add(id(item))
            todo.extend(vars(item).values())
    return sum(storages.values())


def free_bytes(device):
    """Memory free for new tensors on `device`: CUDA's free memory, or the CPU's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError("--batch-size auto: this system reports no available memory (/proc/meminfo); give a number")


AUTO_SHARE = 0.6  # of the free memory for the caches: the step's activations, the decoder and the allocator take the rest
AUTO_LIMIT = 4096  # more gives no speed on any device measured, and delays the first written samples


def plan_batch_size(priors, runtime, job):
    """--batch-size auto for `priors` ({level: prior}, Pipeline.by_level): the largest batch whose
    caches fit AUTO_SHARE of the free memory, at most the samples of one process and AUTO_LIMIT ->
    (batch size, the plan in one line)."""
    per_level = cache_bytes_per_sample(priors, runtime, job.drawing)
    per_sample = max(per_level.values())
    free = free_bytes(runtime.device)
    fits = max(1, int(AUTO_SHARE * free // per_sample))
    share = math.ceil(job.total / runtime.processes.num_processes)
    batch_size = min(fits, share, AUTO_LIMIT)
    mib = 2**20
    levels = ", ".join(f"{level} {size / mib:.1f}" for level, size in per_level.items())
    line = (f"--batch-size auto: {per_sample / mib:.1f} MiB of caches per sample ({levels}), "
            f"{free / 2**30:.1f} GiB free on {runtime.device.type}: "
            f"{fits} fit in {AUTO_SHARE:.0%} of it; batch {batch_size}"
            + ("" if batch_size == fits else f" (at most {min(share, AUTO_LIMIT)}: "
               + ("the samples per process)" if share <= AUTO_LIMIT else f"the limit {AUTO_LIMIT})")))
    return batch_size, line


def advance(bar, samples):
    """Moves the bar on by `samples` (a level's share of a round), never past its total: the shares
    are floats whose sum can exceed the round's count by a rounding error."""
    bar.update(min(samples, bar.total - bar.n))


def make_samples(pipeline, runtime, job, indices, batch_size, keep):
    """Makes samples `indices` of `job` in batches of `batch_size`, batch k on process k mod N, and
    calls keep(batch_indices, labels, images (B, S, S, 3) uint8, *codes) on the CPU after each, the
    codes of every level top first (top_codes, bottom_codes for two levels). One progress bar for
    the whole job, on the main process, advanced per level drawn.
    Running out of device memory is one line naming a batch size to try; the batches kept stay."""
    processes = runtime.processes
    batches = [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)]
    rounds = [batches[k : k + processes.num_processes] for k in range(0, len(batches), processes.num_processes)]
    bar = tqdm(total=len(indices), desc="sampling", disable=not processes.is_main_process,
               bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} samples [{elapsed}<{remaining}]")
    with bar:
        for batches_of_round in rounds:
            if processes.process_index >= len(batches_of_round):
                break
            batch = batches_of_round[processes.process_index]
            in_round = sum(len(each) for each in batches_of_round)  # what the bar counts for all processes
            labels = job.labels_of(batch)
            keys = sample_keys(job.seed, batch, runtime.device)
            try:
                with runtime.autocast():
                    images, *codes = generate(
                        pipeline, len(batch), labels, job.drawing, keys, capture=job.capture,
                        progress=lambda share: advance(bar, share * in_round))
            except torch.OutOfMemoryError:
                raise ValueError(f"out of memory on {runtime.device} at --batch-size {batch_size}: try --batch-size "
                                 f"{max(1, batch_size // 2)} (--out-dir keeps the samples written so far: the "
                                 "command with it resumes)") from None
            images = rearrange(to_uint8(images.float()), "b c h w -> b h w c").cpu()
            keep(batch, labels or [None] * len(batch), images, *(level_codes.cpu() for level_codes in codes))
