"""A directory of samples, written as they are made and resumable: what `sample.py --out-dir` writes.

- `job.json`: what decides the samples (the hashes of the VQ-VAE's and each level's prior's
  checkpoints, seed, temperature, classes, samples per class, precision); a re-run of another job into it is refused.
- `{index:06d}_label{label}.png` (`{index:06d}.png` for unconditional priors): one image per sample.
- `parts/{first index:06d}.npz`: indices, labels and codes of one batch, written after its PNGs.
  A sample is done once a part holds it: a re-run (after a kill, say) makes only the others.
- `samples.npz`, written last by process 0: `images` (N, S, S, 3) uint8, one code array (N, H, W)
  uint16 per level (`code_names`: `top_codes` and `bottom_codes` for two levels, `top_codes`,
  `middle_codes`, `bottom_codes` for three), `labels` (N,) int64 (-1 for unconditional priors), in
  index order. Its images are read back from the PNGs one at a time, so memory does not grow with N.
- `fid_images.npz`, written with it: the same images as `arr_0` (N, S, S, 3) uint8, the one array
  the reference FID / Inception-score evaluators read from an npz (the layout of
  `np.savez(path, images)`).

Every file is written under a temporary name and renamed (pipelines.store.outputs), so a kill leaves
only whole files; a job that fails before its first sample leaves no job.json behind
(pipelines.infer.sample_jobs). Everything is read back with allow_pickle=False.
"""

import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from modelkit import level_names
from pipelines.store.outputs import output_file, remove_temporaries

JOB_FILE = "job.json"
PARTS_DIR = "parts"
SAMPLES_FILE = "samples.npz"
EVALUATOR_FILE = "fid_images.npz"  # arr_0: what the reference FID evaluators read
NO_LABEL = -1


def code_names(n_levels) -> tuple[str, ...]:
    """The names of the code arrays of `n_levels` levels, top first: ("top_codes", "bottom_codes") for two."""
    return tuple(f"{name}_codes" for name in level_names(n_levels))


def png_name(index, label):
    return f"{index:06d}.png" if label is None else f"{index:06d}_label{label}.png"


def start(out_dir, job: dict) -> None:
    """Records `job` in a new directory, or checks that an existing one holds the same job; removes
    the temporary files a kill left behind."""
    out_dir = Path(out_dir)
    remove_temporaries(out_dir)
    remove_temporaries(out_dir / PARTS_DIR)
    file = out_dir / JOB_FILE
    if file.exists():
        stored = json.loads(file.read_text())
        differences = [f"{name} {stored.get(name)!r} there, {job.get(name)!r} now"
                       for name in sorted(set(stored) | set(job)) if stored.get(name) != job.get(name)]
        if differences:
            raise ValueError(f"{out_dir} holds samples of another job: {'; '.join(differences)}")
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and holds no {JOB_FILE}: choose a new or empty --out-dir")
    with output_file(file) as tmp:
        tmp.write_text(json.dumps(job, indent=2))


def done(out_dir) -> set[int]:
    """The indices of the samples already written (held by a part)."""
    return {int(i) for part in parts(out_dir) for i in read_part(part)["indices"]}


def parts(out_dir) -> list[Path]:
    return sorted((Path(out_dir) / PARTS_DIR).glob("*.npz"))


def read_part(path) -> dict:
    with np.load(path, allow_pickle=False) as part:
        return {name: part[name] for name in part.files}


def write_batch(out_dir, indices, labels, images, *codes) -> None:
    """One batch: a PNG per sample, then its part. images (B, S, S, 3) uint8, then each level's
    codes (B, H, W), top first."""
    out_dir = Path(out_dir)
    for index, label, image in zip(indices, labels, images):
        with output_file(out_dir / png_name(index, label), resumes=True) as tmp:
            Image.fromarray(np.asarray(image)).save(tmp, format="png")
    with output_file(out_dir / PARTS_DIR / f"{indices[0]:06d}.npz", resumes=True) as tmp, open(tmp, "wb") as file:
        np.savez(file, indices=np.asarray(indices, np.int64),
                 labels=np.asarray([NO_LABEL if label is None else label for label in labels], np.int64),
                 **{name: np.asarray(level, np.uint16) for name, level in zip(code_names(len(codes)), codes)})


def finish(out_dir, total: int) -> Path:
    """Writes samples.npz and fid_images.npz from the parts and the PNGs (once); -> samples.npz's
    path. Every sample 0..total-1 must be written exactly once."""
    out_dir = Path(out_dir)
    path = out_dir / SAMPLES_FILE
    if path.exists() and (out_dir / EVALUATOR_FILE).exists():
        return path
    pieces = [read_part(part) for part in parts(out_dir)]
    indices = np.concatenate([piece["indices"] for piece in pieces])
    if sorted(indices.tolist()) != list(range(total)):
        raise ValueError(f"{out_dir} does not hold samples 0..{total - 1} once each: its parts are damaged")
    order = np.argsort(indices)
    arrays = {name: np.concatenate([piece[name] for piece in pieces])[order]
              for name in ("labels", *levels_of(pieces[0]))}
    names = [png_name(index, None if label == NO_LABEL else int(label)) for index, label in
             enumerate(arrays["labels"])]
    with output_file(out_dir / EVALUATOR_FILE, resumes=True) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED,
                                                                                    allowZip64=True) as archive:
        write_images(archive, "arr_0.npy", out_dir, names)
    with output_file(path, resumes=True) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED,
                                                                 allowZip64=True) as archive:
        write_images(archive, "images.npy", out_dir, names)
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as file:
                np.lib.format.write_array(file, array, allow_pickle=False)
    return path


def write_images(archive, member, out_dir, names):
    """The PNGs `names` of out_dir as one uint8 array (N, S, S, 3) in `member` of a zip archive (an
    npz), read one at a time: memory does not grow with N."""
    first = np.asarray(Image.open(out_dir / names[0]))
    with archive.open(member, "w", force_zip64=True) as file:
        np.lib.format.write_array_header_2_0(file, {"descr": "|u1", "fortran_order": False,
                                                    "shape": (len(names), *first.shape)})
        for name in names:
            image = np.asarray(Image.open(out_dir / name))
            if image.shape != first.shape or image.dtype != np.uint8:
                raise ValueError(f"{out_dir / name} is {image.dtype} {image.shape}, expected uint8 {first.shape}")
            file.write(np.ascontiguousarray(image).tobytes())


def levels_of(arrays) -> tuple[str, ...]:
    """The code arrays' names among `arrays` (a part's or samples.npz's), top first."""
    return code_names(sum(name.endswith("_codes") for name in arrays))


def load(path) -> dict:
    """samples.npz -> {images, labels, and each level's codes (code_names)} as arrays."""
    with np.load(path, allow_pickle=False) as samples:
        return {name: samples[name] for name in samples.files}
