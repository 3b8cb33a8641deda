"""Image datasets for pixel-space training.

Every dataset yields `(image, label)`: `image` a uint8 tensor (3, S, S), `label` an int (0 when
the source has no labels). `load_dataset(spec, split, size)` accepts as `spec`:

- "builtin": crops of scikit-image's bundled sample photos (no download; see BuiltinPhotos).
- CIFAR-10: `cifar-10-python.tar.gz` (read in place, never extracted), its extracted folder
  `cifar-10-batches-py/`, or a folder holding either. 32x32 only.
- Downsampled ImageNet (32x32, or 64x64 with size=64): a folder with `train_data_batch_*.npz`
  and/or `val_data.npz`, or one .npz file.
- Any other folder of images (jpg, jpeg, png, bmp, webp, gif, tif, tiff): see ImageFolderDataset.

`split` is "train" or "test". A source without splits of its own (one .npz file, a folder without
split folders) holds out every 10th item (0, 10, 20, ...) as test. Every user error raises
DataError with a one-line message naming the file or folder at fault.

Every dataset read from files has a `fingerprint` (`files_fingerprint`: the names, sizes and
modification times of the files it reads, never their contents), which a resumed run checks
(`data_identity`): other files under the same path are found, the same files moved are not.

Damaged input stops the job; nothing is skipped silently, since a dataset that shrinks without
notice changes what a run trains or evaluates on. An unreadable path, a damaged CIFAR-10 or
ImageNet file and an empty image file are refused when the dataset is built; an image file that
cannot be decoded (corrupt, truncated) is refused when it is first read.
"""

import hashlib
import io
import math
import os
import pickle
import re
import stat
import tarfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import skimage.data
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset

from pipelines.data.holdout import IMAGE_TEST_EVERY, TEST_FOLDERS, TRAIN_FOLDER, is_test_image, is_test_photo
from pipelines.errors import one_line

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ACCEPTED_FORMATS = (
    "'builtin', CIFAR-10's cifar-10-python.tar.gz or cifar-10-batches-py/, downsampled-ImageNet "
    f".npz files, or a folder of images ({', '.join(ext[1:] for ext in IMAGE_EXTENSIONS)})"
)


class DataError(ValueError):
    """A dataset path or argument the user must fix; the message is one line."""


def to_model_range(images_uint8: Tensor) -> Tensor:
    """Pixel values 0..255 -> floats in [-1, 1] (k -> k / 127.5 - 1), shape preserved."""
    return images_uint8.float() / 127.5 - 1


def to_uint8(x: Tensor) -> Tensor:
    """Inverse of to_model_range, rounding to the nearest pixel value and clamping to 0..255."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class ImageTensorDataset(Dataset):
    """Images held in memory: `images` uint8 (N, 3, S, S), `labels` int64 (N,)."""

    def __init__(self, images: Tensor, labels: Tensor):
        assert len(images) == len(labels), f"{len(images)} images but {len(labels)} labels"
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def _held_out(items, split: str, source: Path) -> list:
    """The items of `split` of a source without splits of its own (`pipelines.data.holdout`)."""
    chosen = [item for i, item in enumerate(items) if is_test_image(i) == (split == "test")]
    if not chosen:
        raise DataError(f"{source} holds {len(items)} image(s): too few to hold out every {IMAGE_TEST_EVERY}th as test")
    return chosen


def _check_readable(path: Path) -> None:
    """Refuses a path this process may not read (a folder must also be searchable)."""
    mode = os.R_OK | os.X_OK if path.is_dir() else os.R_OK
    if not os.access(path, mode):
        raise DataError(f"cannot read {path}: permission denied")


def _check_split_and_size(split: str, size: int) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    _check_size(size)


def _check_size(size: int) -> None:
    if not (isinstance(size, int) and size > 0):
        raise DataError(f"size must be a positive integer, got {size!r}")


# ------------------------------------------------------------------------------------------------
# "builtin": scikit-image's sample photos

# Label = index in this tuple. skimage.data.cat is the same photo as chelsea, so it is left out;
# "motorcycle" is the left view of skimage.data.stereo_motorcycle (the right one is the same scene).
BUILTIN_PHOTOS = (
    "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel", "motorcycle",
    "chelsea", "coffee",
)

BUILTIN_DEFAULT_COUNTS = {"train": 20_000, "test": 2_000}
BUILTIN_MAX_BYTES = 256 * 2**20  # larger crops come in smaller numbers: at most this much memory


def builtin_split_photos(split: str) -> list[str]:
    """The names of the photos a split's crops are cut from, in label order."""
    return [name for name in BUILTIN_PHOTOS if is_test_photo(name) == (split == "test")]


def builtin_photo(name: str) -> np.ndarray:
    """One of BUILTIN_PHOTOS as uint8 (H, W, 3), from the files that ship with scikit-image."""
    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


class BuiltinPhotos(ImageTensorDataset):
    """Random square crops of scikit-image's bundled photos: real images without a download.

    A crop's side is 1/16 to 1/2 of the photo's shorter side (log-uniform) but not below S pixels
    when the photo allows it (no upsampling blur); it is resized to S x S with antialiasing. Half
    the training crops, at random, are mirrored left to right: more variety from few photos. Test
    crops come only from the test photos (`pipelines.data.holdout`), which train never sees, so
    test bits/dim measures generalisation. All crops are made at construction from a fixed seed (about 2 s for 20,000
    at S=32). By default at most BUILTIN_MAX_BYTES of crops are made (at S=256: 1365 train,
    136 test). Example: `BuiltinPhotos("test", 32).images.shape == (2000, 3, 32, 32)`.
    """

    def __init__(self, split: str, size: int = 32, n_images: int | None = None, seed: int = 0):
        _check_split_and_size(split, size)
        if n_images is None:
            fitting = BUILTIN_MAX_BYTES // (3 * size * size) // (10 if split == "test" else 1)
            n_images = min(BUILTIN_DEFAULT_COUNTS[split], fitting)
        if n_images < 1:
            raise DataError(f"n_images must be at least 1, got {n_images}")
        names = builtin_split_photos(split)
        photos = [Image.fromarray(builtin_photo(name)) for name in names]
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        images, sources = random_crops(photos, n_images, size, rng)
        if split == "train":
            mirrored = torch.from_numpy(rng.random(n_images) < 0.5)
            images[mirrored] = images[mirrored].flip(-1)
        labels = torch.tensor([BUILTIN_PHOTOS.index(names[source]) for source in sources])
        super().__init__(images, labels)


def random_crops(photos: list[Image.Image], n: int, size: int, rng: np.random.Generator) -> tuple[Tensor, np.ndarray]:
    """`n` crops (random_crop), each of a photo drawn at random -> uint8 (n, 3, S, S) and each crop's
    photo index (n,)."""
    sources = rng.integers(len(photos), size=n)
    crops = np.empty((n, size, size, 3), np.uint8)
    for i, source in enumerate(sources):
        crops[i] = random_crop(photos[source], size, rng)
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous(), sources


def random_crop(photo: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """One random square of `photo`, resized to (size, size, 3) uint8."""
    short_side = min(photo.size)
    smallest = min(short_side, max(size, short_side / 16))
    largest = max(smallest, short_side / 2)
    side = np.exp(rng.uniform(np.log(smallest), np.log(largest)))
    left = rng.uniform(0, photo.width - side)
    top = rng.uniform(0, photo.height - side)
    box = (left, top, left + side, top + side)
    # reducing_gap first shrinks by an integer factor with a box filter: 2x faster, still antialiased
    return np.asarray(photo.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0))


# ------------------------------------------------------------------------------------------------
# CIFAR-10: Python pickles, parsed without running code

CIFAR_TARBALL = "cifar-10-python.tar.gz"


CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers, and calls nothing else.

    Unpickling calls whatever the file names, so a tampered batch could run any code. A CIFAR
    batch only needs these names (numpy 1 pickles say numpy.core, numpy 2 ones numpy._core).
    """

    allowed_globals = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed_globals:
            raise DataError(f"the pickle asks for {module}.{name}; only numpy arrays are allowed")
        return self.allowed_globals[module, name]


def load_cifar10(path: str | Path, split: str, size: int = 32) -> ImageTensorDataset:
    """CIFAR-10 from the official tarball (read without extracting) or its extracted folder.

    All five train batches must be present: a partial set means a broken download.
    """
    _check_split_and_size(split, size)
    if size != 32:
        raise DataError(f"CIFAR-10 images are 32x32, got size={size}: use size=32")
    source = _find_cifar10(Path(path))
    if source is None:
        raise DataError(
            f"CIFAR-10 not found at {path}: expected {CIFAR_TARBALL} or its extracted folder {CIFAR_FOLDER}/"
        )
    names = CIFAR_BATCHES[split]
    raw_batches = _read_tar_members(source, names) if source.is_file() else _read_files(source, names)
    batches = [_parse_cifar_batch(raw, f"{source}/{name}") for name, raw in zip(names, raw_batches)]
    images = torch.from_numpy(np.concatenate([data for data, _ in batches])).view(-1, 3, 32, 32)
    labels = torch.tensor([label for _, batch_labels in batches for label in batch_labels])
    read = [source] if source.is_file() else [source / name for name in names]
    return _with_fingerprint(ImageTensorDataset(images, labels), Path(path), read)


def _find_cifar10(path: Path) -> Path | None:
    """The tarball or batches folder that `path` is or holds, else None."""
    if path.is_file():
        return path if tarfile.is_tarfile(path) else None
    all_batches = CIFAR_BATCHES["train"] + CIFAR_BATCHES["test"]
    for folder in (path, path / CIFAR_FOLDER):
        if any((folder / name).is_file() for name in all_batches):
            return folder
    if (path / CIFAR_TARBALL).is_file():
        return path / CIFAR_TARBALL
    return None


def _read_files(folder: Path, names: list[str]) -> list[bytes]:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 folder {folder} lacks {', '.join(missing)}: expected {', '.join(names)}"
        )
    return [(folder / name).read_bytes() for name in names]


def _read_tar_members(tarball: Path, names: list[str]) -> list[bytes]:
    """Bytes of the members called `names` (in any folder of the tarball), in that order."""
    found = {}
    try:
        with tarfile.open(tarball) as archive:
            for member in archive:
                if member.isfile() and Path(member.name).name in names:
                    found[Path(member.name).name] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:  # truncated or damaged archive
        raise DataError(f"cannot read tarball {tarball}: {one_line(err)} (damaged or incomplete download?)") from err
    missing = [name for name in names if name not in found]
    if missing:
        raise DataError(
            f"tarball {tarball} lacks {CIFAR_FOLDER}/{missing[0]}: the only tarball accepted is "
            f"CIFAR-10's {CIFAR_TARBALL}"
        )
    return [found[name] for name in names]


def _parse_cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, list[int]]:
    """(data (N, 3072) uint8 in CHW order, N labels in 0..9) from one batch pickle."""
    try:
        # encoding="bytes": the official files are Python 2 pickles, whose str become bytes
        batch = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # a malformed pickle fails in many ways; all mean the same to the user
        raise DataError(f"cannot read CIFAR-10 batch {source}: {one_line(err)}") from err
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    data_ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)
    labels_ok = isinstance(labels, list) and all(label in range(10) for label in labels)
    if not (data_ok and labels_ok and len(labels) == len(data)):
        raise DataError(
            f"{source} is not a CIFAR-10 batch: expected a dict with b'data' (N x 3072 uint8) "
            "and b'labels' (N ints in 0..9)"
        )
    return data, labels


# ------------------------------------------------------------------------------------------------
# Downsampled ImageNet (Chrabaszcz et al., 2017): npz files, read with allow_pickle=False

IMAGENET_TRAIN_FILE = re.compile(r"train_data_batch_(\d+)\.npz")


IMAGENET_TEST_FILE = "val_data.npz"


def load_downsampled_imagenet(path: str | Path, split: str, size: int = 32) -> Dataset:
    """ImageNet 32x32 (or 64x64) npz files, labels 1..1000 made 0..999.

    A folder gives train = every train_data_batch_<k>.npz present (a few of the ten are fine on a
    small machine) and test = val_data.npz. One .npz file is split by holding out every 10th image.
    Each file stays its own tensor (joined by ConcatDataset), so nothing is copied twice.
    """
    _check_split_and_size(split, size)
    path = Path(path)
    if path.is_file():
        dataset = _load_imagenet_npz(path, size)
        return _with_fingerprint(Subset(dataset, _held_out(range(len(dataset)), split, path)), path, [path])
    files = _imagenet_files(path)[split]
    if not files:
        expected = "train_data_batch_<k>.npz files" if split == "train" else IMAGENET_TEST_FILE
        raise DataError(f"no downsampled-ImageNet {split} split in {path}: expected {expected}")
    return _with_fingerprint(ConcatDataset([_load_imagenet_npz(file, size) for file in files]), path, files)


def _imagenet_files(folder: Path) -> dict[str, list[Path]]:
    """{"train": the train batches in numeric order, "test": [val_data.npz] or []}."""
    batch_numbers = {}
    for file in folder.glob("train_data_batch_*.npz"):
        if match := IMAGENET_TRAIN_FILE.fullmatch(file.name):
            batch_numbers[file] = int(match.group(1))
    test_file = folder / IMAGENET_TEST_FILE
    return {
        "train": sorted(batch_numbers, key=batch_numbers.get),
        "test": [test_file] if test_file.is_file() else [],
    }


def _load_imagenet_npz(file: Path, size: int) -> ImageTensorDataset:
    try:
        with np.load(file, allow_pickle=False) as npz:
            data, labels = npz["data"], npz["labels"]
    except Exception as err:  # zip, npy header and missing-key errors all mean "not this format"
        raise DataError(f"cannot read downsampled-ImageNet file {file}: {one_line(err)}") from err
    side = round((data.shape[-1] / 3) ** 0.5) if data.ndim == 2 else 0
    if not (
        data.dtype == np.uint8 and side > 0 and data.shape[1] == 3 * side * side
        and np.issubdtype(labels.dtype, np.integer) and labels.shape == (len(data),)
    ):
        raise DataError(
            f"{file} is not downsampled ImageNet: expected 'data' (N x 3*S*S uint8) and 'labels' (N ints)"
        )
    if size != side:
        raise DataError(f"{file} holds {side}x{side} images, got size={size}: use size={side}")
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        raise DataError(f"{file} has labels {labels.min()}..{labels.max()}: expected 1..1000")
    images = torch.from_numpy(data).view(-1, 3, side, side)
    return ImageTensorDataset(images, torch.from_numpy(labels.astype(np.int64) - 1))


def _is_downsampled_imagenet(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".npz"
    return any(_imagenet_files(path).values())


# ------------------------------------------------------------------------------------------------
# Any folder of images


class ImageFolderDataset(Dataset):
    """Every image under `root` (recursive, extensions case-insensitive, hidden paths skipped).

    Splits (`_split_folders`): a root holding `train/` beside one test folder (`test/`, `val/`,
    `valid/` or `validation/`: `pipelines.data.holdout`) keeps them, and one holding only `train/`
    is read as `train/`; a split folder is never a class. Without split folders, every 10th file
    in sorted order is test. Classes (`_class_groups`): the first-level subfolders of a split
    folder (or of the folder without splits), sorted over both splits so that train and test
    agree; label = the index of an image's class, 0 for all where there are none. Numbered shards
    of one set, as NVIDIA ships FFHQ (`00000/00000.png` ... `69000/69999.png`), are no classes
    (`_numbered_shards`).

    Refused in one line: images lying beside class folders (they have no class), a split with class
    folders beside one without (a flat `val/` whose labels lie in a separate file, as ImageNet
    ships it, is not supported yet), an empty class folder, a link that leads nowhere, and one
    image reachable from two class folders or from both splits (`_check_apart`). Links are
    otherwise followed, each real folder and file once (see `_image_stats`). Each image becomes
    8-bit RGB (EXIF rotation applied; see to_rgb8), its shorter side is resized to S (antialiased)
    and the centre S x S kept; S x S images pass unchanged. Files are decoded when accessed, so
    construction only lists them: an empty file is refused at construction, a file that cannot be
    decoded (corrupt, truncated) raises DataError naming it when it is read. `fingerprint`: of the
    split's files (`files_fingerprint`), relative to `root`.
    """

    def __init__(self, root: str | Path, split: str, size: int = 32):
        _check_split_and_size(split, size)
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder not found: {root}")
        self.size = size
        folders = _split_folders(root)
        groups = {name: _class_groups(folder) for name, folder in folders.items()}  # {split: {class: images}}
        _check_same_layout(folders, groups)
        _check_apart(groups)
        self.classes = sorted({name for classes in groups.values() for name in classes if name is not None})
        has_splits = len(folders) == 2
        source = split if has_splits else next(iter(folders))  # "all", or "train" alone: every 10th is test
        split_root, chosen = folders[source], groups[source]
        stats = {path: status for images in chosen.values() for path, status in images.items()}
        files = sorted(stats)
        self.files = files if has_splits or not files else _held_out(files, split, split_root)
        if not self.files:
            raise DataError(f"no images in {split_root}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
        empty = [file for file in self.files if stats[file].size == 0]
        if empty:
            raise DataError(f"empty image file {empty[0]} (0 bytes; {len(empty)} such in {split_root}): remove or replace it")
        label_of_class = {None: 0, **{name: label for label, name in enumerate(self.classes)}}
        label_of = {path: label_of_class[name] for name, images in chosen.items() for path in images}
        self.labels = [label_of[file] for file in self.files]
        self.fingerprint = files_fingerprint(root, {file: stats[file] for file in self.files})

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return read_image(self.files[index], self.size), self.labels[index]


class ImageFiles(Dataset):
    """Every image of some files and folders (see image_files), without splits or labels (each label
    is 0), read as ImageFolderDataset reads them. Example: `ImageFiles(["a.png", "photos/"], 32)`."""

    def __init__(self, paths: list[str | Path], size: int = 32):
        _check_size(size)
        self.size = size
        self.files = image_files(paths)
        self.labels = [0] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return read_image(self.files[index], self.size), 0


def read_image(file: str | Path, size: int) -> Tensor:
    """An image file -> uint8 (3, S, S): 8-bit RGB (EXIF rotation applied; see to_rgb8), its shorter
    side resized to S and the centre S x S kept. DataError naming the file if it cannot be decoded."""
    try:
        with Image.open(file) as image:
            image = to_rgb8(ImageOps.exif_transpose(image))
    except Exception as err:  # PIL raises many types for truncated or foreign files
        raise DataError(f"cannot read image {file}: {one_line(err)}") from err
    pixels = np.array(_resize_center_crop(image, size))  # (S, S, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def image_files(paths: list[str | Path]) -> list[Path]:
    """The images that command-line arguments name: a file as given, a folder's images (recursive
    and sorted, as an image folder lists them); refuses a path that is neither or yields none."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"image not found: {path}")
        _check_readable(path)
        if path.is_dir():
            found = _image_files(path)
            if not found:
                raise DataError(f"no images in {path}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
            files.extend(found)
        else:
            files.append(path)
    return files


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 32-bit ints, as old Pillows open 16-bit PNGs
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, as it looks.

    Grayscale becomes three equal channels. 16-bit values v are scaled to round(v / 257) (65535 ->
    255), never clipped (PIL's own convert clips them at 255); Pillow itself reduces 16-bit RGB to
    its high bytes (v // 256). Transparent images (alpha channel or palette transparency) are
    composited over white, the background they are usually shown on, instead of showing whatever
    colour their transparent pixels happen to hold. Float images have no 8-bit scale: refused.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{image.mode} image with values {values.min()}..{values.max()}: expected 16-bit 0..65535")
        image = Image.fromarray(np.round(values / 257).astype(np.uint8))  # mode L
    elif image.mode == "F":
        raise DataError("floating-point image (mode F): no defined 8-bit scale; convert it to 8 or 16 bits")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class FileStat(NamedTuple):
    """What a listing learns of an image file: its identity (device, inode: links to one file are
    one file), its size and its modification time in whole seconds."""

    identity: tuple[int, int]
    size: int
    mtime: int

    @classmethod
    def of(cls, status: os.stat_result) -> "FileStat":
        return cls((status.st_dev, status.st_ino), status.st_size, int(status.st_mtime))


def _broken_link(path: Path) -> DataError:
    return DataError(f"broken link {path} -> {os.readlink(path)}: remove it or restore its target")


def _subfolders(folder: Path) -> list[Path]:
    """The visible subfolders, sorted, without links back to the folder or above it. A visible link
    that leads nowhere is refused: in place of a class folder it would drop the class unnoticed."""
    above = _self_and_above(folder)
    subfolders = []
    for sub in sorted(folder.iterdir()):
        if sub.name.startswith("."):
            continue
        if sub.is_symlink() and not sub.exists():
            raise _broken_link(sub)
        if sub.is_dir() and _identity(sub) not in above:
            subfolders.append(sub)
    return subfolders


def _split_folders(root: Path) -> dict[str, Path]:
    """{"train": ..., "test": ...} of a root holding train/ and a test folder (test/, val/, valid/ or
    validation/), {"train": root/train} of one whose only subfolder is train/, else {"all": root}.
    A root whose subfolders are all split names is never read as classes; a train/ among other
    folders and no test folder is a class (CIFAR-100 has one)."""
    names = [sub.name for sub in _subfolders(root)]
    tests = [name for name in names if name in TEST_FOLDERS]
    if not tests and names != [TRAIN_FOLDER]:
        return {"all": root}
    shown = ", ".join(f"{name}/" for name in names)
    if len(tests) > 1:
        raise DataError(f"{root} holds {shown}: more than one test split; keep one of "
                        f"{', '.join(f'{name}/' for name in tests)} there (move the others out)")
    if TRAIN_FOLDER not in names:
        raise DataError(f"{root} holds {shown} but no {TRAIN_FOLDER}/ beside {tests[0]}/: give the folder that holds "
                        f"both splits, or give {root / tests[0]} as a folder of its own")
    others = [name for name in names if name != TRAIN_FOLDER and name not in tests]
    if others:
        raise DataError(f"{root} holds split folders beside other folders ({shown}): move "
                        f"{', '.join(f'{name}/' for name in others)} out, or into each split as a class")
    if loose := _loose_images(root):
        raise DataError(f"{len(loose)} image(s) lie directly in {root} (e.g. {loose[0].name}) beside the split "
                        f"folders {shown}: move them into a split folder")
    return {"train": root / TRAIN_FOLDER, **({"test": root / tests[0]} if tests else {})}


def _class_groups(folder: Path) -> dict[str | None, dict[Path, FileStat]]:
    """{class name: {image: FileStat}} of a folder whose first-level subfolders are its classes, or
    {None: every image} of one without subfolders. Refuses images beside the class folders and a
    class folder without images."""
    classes = _subfolders(folder)
    if not classes:
        return {None: _image_stats(folder)}
    if loose := _loose_images(folder):
        raise DataError(
            f"{len(loose)} image(s) lie directly in {folder} (e.g. {loose[0].name}) beside the class folders "
            f"{', '.join(sub.name for sub in classes)}: move them into a class folder (a label is a first-level folder)"
        )
    groups = {sub.name: _image_stats(sub) for sub in classes}
    for sub in classes:
        if not groups[sub.name]:
            raise DataError(f"class folder {sub} holds no images (expected files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}): remove it or add its images")
    if _numbered_shards(groups):
        return {None: {path: status for images in groups.values() for path, status in images.items()}}
    return groups


def _numbered_shards(groups: dict[str, dict[Path, FileStat]]) -> bool:
    """Whether class folders are shards of one numbered set, as NVIDIA ships FFHQ
    (`images1024x1024/00000/00000.png` ... `69000/69999.png`): every folder and image is named by a
    number and each folder holds only images numbered from its own number up to the next folder's.
    Class folders `0/`, `1/` of images numbered from 0 in each are classes, never shards."""
    if not all(name.isdigit() for name in groups):
        return False
    starts = sorted(int(name) for name in groups)
    ends = {start: end for start, end in zip(starts, [*starts[1:], math.inf])}
    for name, images in groups.items():
        start = int(name)
        if not all(path.stem.isdigit() and start <= int(path.stem) < ends[start] for path in images):
            return False
    return len(groups) > 1


def _loose_images(folder: Path) -> list[Path]:
    """The visible files named like images that lie directly in `folder`, sorted."""
    return sorted(path for path in folder.iterdir()
                  if not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir())


def _check_same_layout(folders: dict[str, Path], groups: dict) -> None:
    """Refuses a split without class folders beside one with them: its images would all get class 0."""
    flat = [split for split, classes in groups.items() if None in classes and classes[None]]
    if len(groups) == 2 and len(flat) == 1:
        classed = "test" if flat[0] == "train" else "train"
        name = folders[flat[0]].name
        raise DataError(
            f"{folders[flat[0]]} holds its images without class folders but {folders[classed]} has class folders "
            f"({', '.join(sorted(groups[classed]))}): a flat {name}/ with its labels in a separate file (as ImageNet "
            f"ships its validation images) is not supported yet; sort its images into {name}/<class>/ folders"
        )


def _check_apart(groups: dict[str, dict[str | None, dict[Path, FileStat]]]) -> None:
    """Refuses an image (a real file: device and inode) that two class folders, or both splits,
    reach (through links or hard links): it would be trained on with two labels, or tested on
    after being trained on. `groups`: {split: {class: {image: FileStat}}}."""
    first = {}  # identity -> (split, class, path) of the first path that reached it
    for split, classes in groups.items():
        for name, images in classes.items():
            for path, status in images.items():
                seen_split, seen_class, seen_path = first.setdefault(status.identity, (split, name, path))
                if (seen_split, seen_class) == (split, name):
                    continue
                where = (f"both {seen_split} and {split}" if seen_split != split
                         else f"both class folders {seen_class} and {name}")
                raise DataError(f"{seen_path} and {path} are the same image, in {where}: remove one")


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively and sorted, skipping hidden files and folders (see `_image_stats`)."""
    return sorted(_image_stats(folder))


def _image_stats(folder: Path) -> dict[Path, FileStat]:
    """{image path: FileStat} of the image files under `folder`, recursively, skipping hidden files
    and folders.

    Links are followed, but each real folder is walked once and each real file (by device and
    inode) listed once, under the first path that reaches it in sorted order: a link to the folder
    itself (`self -> .`) or above it (`up -> ..`) would otherwise repeat the images without end. A
    subfolder that cannot be listed stops the search (Path.rglob would skip it silently), and so
    does a broken link named like an image.
    """

    def refuse(error: OSError):
        raise DataError(f"cannot read {error.filename}: {error.strerror}")

    closed = _self_and_above(folder)  # folders not to enter: those walked, and the start and above it
    files, listed = {}, set()
    for directory, subfolders, names in os.walk(folder, onerror=refuse, followlinks=True):
        closed.add(_identity(directory))
        subfolders[:] = [name for name in sorted(subfolders)
                         if not name.startswith(".") and _identity(os.path.join(directory, name)) not in closed]
        for name in sorted(names):
            path = Path(directory) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                status = path.stat()
            except FileNotFoundError:
                raise _broken_link(path) from None
            identity = status.st_dev, status.st_ino
            if stat.S_ISREG(status.st_mode) and identity not in listed:
                listed.add(identity)
                files[path] = FileStat.of(status)
    return files


def files_fingerprint(root: Path, files: dict[Path, FileStat]) -> str:
    """SHA-256 of the sorted paths of `files` relative to `root`, their sizes and modification times:
    their contents are never read, so a resume on a large image folder costs one listing. Moved
    (mv, cp -a, rsync -a) the same files give the same fingerprint; whole seconds, as file
    systems keep times at different precisions."""
    digest = hashlib.sha256()
    for relative, status in sorted((path.relative_to(root).as_posix(), status) for path, status in files.items()):
        digest.update(f"{relative}\0{status.size}\0{status.mtime}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def _with_fingerprint(dataset: Dataset, spec: Path, files: list[Path]) -> Dataset:
    """`dataset` with the fingerprint of the files it was read from (a one-file spec: by file name)."""
    root = spec if spec.is_dir() else spec.parent
    dataset.fingerprint = files_fingerprint(root, {file: FileStat.of(os.stat(file)) for file in files})
    return dataset


def data_identity(train_set: Dataset, test_set: Dataset) -> dict:
    """What a run's data is, stored in its state and checked when it resumes: the records of each
    split and, for data read from files, each split's fingerprint (a code database adds its own)."""
    identity = {}
    for split, dataset in (("train", train_set), ("test", test_set)):
        identity[f"{split}_records"] = len(dataset)
        if getattr(dataset, "fingerprint", None) is not None:
            identity[f"{split}_fingerprint"] = dataset.fingerprint
    return identity


def _self_and_above(folder: Path) -> set[tuple[int, int]]:
    real = Path(os.path.realpath(folder))
    return {_identity(path) for path in (real, *real.parents)}


def _identity(path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    if scale != 1:
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


# ------------------------------------------------------------------------------------------------


def absolute_spec(spec: str) -> str:
    """A dataset spec as a run or a code database stores it: its path made absolute (`~` expanded),
    so that the same words given in another folder are seen to name other data; "builtin" stays a
    name. The one rule for every stored data path."""
    return spec if spec == "builtin" else str(Path(spec).expanduser().resolve())


def load_dataset(spec: str, split: str, size: int = 32) -> Dataset:
    """The dataset `spec` names (formats in the module docstring), as a Dataset of (image, label).

    "builtin" always means BuiltinPhotos, even if a folder of that name exists.
    """
    _check_split_and_size(split, size)
    if spec == "builtin":
        return BuiltinPhotos(split, size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"dataset not found: {path} (expected {ACCEPTED_FORMATS})")
    _check_readable(path)
    if _find_cifar10(path) is not None:
        return load_cifar10(path, split, size)
    if _is_downsampled_imagenet(path):
        return load_downsampled_imagenet(path, split, size)
    if path.is_dir():
        return ImageFolderDataset(path, split, size)
    raise DataError(f"{path} is not a dataset this loader knows: expected {ACCEPTED_FORMATS}")


def image_inputs(batch):
    images, _ = batch
    return to_model_range(images), None, None
