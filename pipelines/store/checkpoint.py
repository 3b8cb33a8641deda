"""Checkpoint files: weights as safetensors with the model's config inside, written atomically
through pipelines.store.outputs (as are the image grids the scripts write).

A checkpoint is one `.safetensors` file whose metadata holds `format_version`, `kind` (which model
class it is for), `stage` (what it is in the pipeline: pixels, top_prior, bottom_prior, vqvae,
classifier; see `stage_of`), `config` (the config dataclass as JSON) and free-form extras such as
the training step. Checkpoints written before format version 1 have neither `format_version` nor
`stage`: they load as before, and their stage is read off their kind and extras. Nothing in it is
ever unpickled. A run directory holds its latest checkpoint as `model.safetensors`; everywhere a
checkpoint is asked for, the run directory or the file may be given.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torchvision.utils import save_image

from pipelines.errors import one_line
from pipelines.store.outputs import output_file
from prior import PixelSNAIL, PixelSNAILConfig
from vqvae import VQVAE2, VQVAE2Config

CHECKPOINT_NAME = "model.safetensors"
HEADER_ERROR = "Error while deserializing header: "  # how safetensors begins the refusal of a damaged header
HEADER_ERROR_CHARACTERS = 80
FORMAT_VERSION = 1  # the format this code writes; it reads this one and the unversioned one before it
PIXELSNAIL_KIND = "pixelsnail"
VQVAE_KIND = "vqvae2"


class CheckpointError(ValueError):
    """A checkpoint that is missing, not ours, damaged, or for another kind of model."""


def write_image_grid(images, path, nrow=None):
    """Images in [-1, 1], (N, 3, H, W), as one PNG grid of `nrow` per row (default: about square),
    written atomically."""
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    with output_file(path) as tmp:
        save_image((images.float().cpu() + 1) / 2, tmp, format="png", nrow=nrow)


def save_checkpoint(path, state_dict, kind, config, **extra):
    """Writes `state_dict` with `kind`, its stage, `config` (a dataclass with to_json) and `extra` metadata."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
    metadata = {"format_version": str(FORMAT_VERSION), "kind": kind, "stage": stage_of(kind, extra),
                "config": config.to_json(), "extra": json.dumps(extra, sort_keys=True)}
    with output_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def stage_of(kind, extra):
    """What a model of `kind` with these extras is in the pipeline: a VQ-VAE is `vqvae`, a PixelSNAIL
    trained on a level's codes names the level in its extras (`top_prior`, `middle_prior`,
    `bottom_prior`, `level1_prior`...), any other PixelSNAIL models pixels; other kinds (the sample
    metrics' classifier) are their own stage."""
    if kind == VQVAE_KIND:
        return "vqvae"
    if kind == PIXELSNAIL_KIND:
        return f"{extra['level']}_prior" if isinstance(extra.get("level"), str) else "pixels"
    return kind


def resolve_checkpoint(path):
    """A run directory -> its latest checkpoint file; a file -> itself."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def read_checkpoint(path, tensors=True):
    """A checkpoint (run directory or file) -> (its file, metadata, extra dict, state dict or None
    where not `tensors`), its metadata checked to be a checkpoint of this project in a format this
    code reads.

    Only safetensors is read: a pickle or a torch.save file is refused unopened, as unpickling
    runs whatever code the file names.
    """
    path = resolve_checkpoint(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {name: f.get_tensor(name) for name in f.keys()} if tensors else None
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({_what_it_is(path, error)})") from None
    if "kind" not in metadata or "config" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a checkpoint of this project (no kind/config)")
    version = metadata.get("format_version", "0")
    if not version.isdigit():
        raise CheckpointError(f"{path} has format_version {version!r}: expected a non-negative integer")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version}, newer than this code reads ({FORMAT_VERSION}): "
                              "update the code")
    try:
        extra = json.loads(metadata.get("extra", "{}"))
    except ValueError:
        extra = None
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path} has damaged metadata: 'extra' is not a JSON object")
    if tensors:
        _check_finite(path, state_dict)
    return path, metadata, extra, state_dict


def _check_finite(path, state_dict):
    """Refuses weights holding NaN or Inf (bit rot, a bad copy): every model would compute NaN from them."""
    bad = {name: int(tensor.numel() - torch.isfinite(tensor).sum()) for name, tensor in state_dict.items()
           if tensor.is_floating_point()}
    bad = {name: count for name, count in bad.items() if count}
    if bad:
        raise CheckpointError(f"{path} is damaged: {sum(bad.values())} weight value(s) are NaN or infinite, in "
                              f"{len(bad)} tensor(s) ({', '.join(list(bad)[:3])}{', ...' if len(bad) > 3 else ''}); "
                              "restore the file or use another checkpoint")


def read_metadata(path):
    """A checkpoint's checked metadata, its tensors left unread -> (metadata dict, extra dict)."""
    return read_checkpoint(path, tensors=False)[1:3]


def checkpoint_stage(path):
    """What a checkpoint (run directory or file) is in the pipeline: pixels, a level's prior
    (top_prior, middle_prior, bottom_prior...), vqvae or classifier, as `stage_of` tells it from the
    kind and extras every format version records (the `stage` field written since version 1 is for
    other readers: a middle prior's read `pixels` before this rule knew its level)."""
    metadata, extra = read_metadata(path)
    return stage_of(metadata["kind"], extra)


def load_checkpoint(path, kind):
    """Reads a checkpoint of the given kind -> (state_dict, config JSON text, extra dict)."""
    path, metadata, extra, state_dict = read_checkpoint(path)
    if metadata["kind"] != kind:
        raise CheckpointError(f"{path} holds a {metadata['kind']!r} model, expected {kind!r}")
    return state_dict, metadata["config"], extra


def _what_it_is(path, error):
    """Why a file is not safetensors, in words: pickles and torch.save files are named as such."""
    with open(path, "rb") as f:
        start = f.read(4)
    if start.startswith(b"PK\x03\x04"):
        return "it is a zip archive, as torch.save writes: not loaded, since unpickling it could run code"
    if start[:1] == b"\x80":
        return "it is a pickle: not loaded, since unpickling it could run code"
    if str(error).startswith(HEADER_ERROR):  # safetensors may quote the damaged header at length: the gist only
        return "its header is damaged: " + one_line(str(error).removeprefix(HEADER_ERROR), HEADER_ERROR_CHARACTERS)
    return one_line(error)


def load_model(path, kind, model_class, config_class):
    """A checkpoint (run directory or file) -> (model of `kind` in eval mode, extra metadata)."""
    state_dict, config_json, extra = load_checkpoint(path, kind)
    try:
        config = config_class.from_json(config_json)
    except (ValueError, TypeError) as error:  # not JSON, unknown fields, values of the wrong type
        raise CheckpointError(f"{resolve_checkpoint(path)} has a damaged {config_class.__name__} ({error})") from None
    model = model_class(config)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CheckpointError(f"{resolve_checkpoint(path)}: weights do not fit its config ({error})") from None
    return model.eval(), extra


def load_pixelsnail(path):
    return load_model(path, PIXELSNAIL_KIND, PixelSNAIL, PixelSNAILConfig)


def load_vqvae(path):
    return load_model(path, VQVAE_KIND, VQVAE2, VQVAE2Config)
