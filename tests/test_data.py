"""Tests for pipelines/data/datasets.py on tiny datasets written to tmp_path in the official layouts."""

import contextlib
import io
import os
import pickle
import shlex
import shutil
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipelines.data.datasets import (BUILTIN_PHOTOS, SPLITS, BuiltinPhotos, DataError, ImageFolderDataset,
                                     builtin_photo, builtin_split_photos, load_dataset, random_crops, to_model_range,
                                     to_uint8)
from pipelines.data.holdout import BUILTIN_TEST_PHOTOS

IMAGES_PER_BATCH = 3


def all_items(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), list(labels)


def to_chw_rows(images_hwc):
    """(N, S, S, 3) -> (N, 3*S*S) rows in the CHW order of the CIFAR and ImageNet files."""
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message


# ------------------------------------------------------------------------------------------------
# CIFAR-10


class Python2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as the official CIFAR-10 batches hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def official_cifar_pickle(batch):
    """A batch pickled as the official (Python 2, numpy 1) files are: protocol 2, numpy.core names."""
    buffer = io.BytesIO()
    Python2StylePickler(buffer, protocol=2).dump(batch)
    raw = buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    return raw


@pytest.fixture
def cifar_batches():
    """{batch name: (images (N, 32, 32, 3) uint8, labels)} for the 5 train batches and test_batch."""
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {
        name: (rng.integers(0, 256, (IMAGES_PER_BATCH, 32, 32, 3), dtype=np.uint8),
               [int(label) for label in rng.integers(0, 10, IMAGES_PER_BATCH)])
        for name in names
    }


def write_cifar_folder(folder, cifar_batches, pickle_batch=official_cifar_pickle):
    folder.mkdir(parents=True)
    for name, (images, labels) in cifar_batches.items():
        batch = {b"batch_label": name.encode(), b"data": to_chw_rows(images), b"labels": labels,
                 b"filenames": [b"x.png"] * len(labels)}
        (folder / name).write_bytes(pickle_batch(batch))
    return folder


def write_cifar_tarball(path, batches_folder):
    with tarfile.open(path, "w:gz") as archive:
        archive.add(batches_folder, arcname="cifar-10-batches-py")
    return path


CIFAR_LAYOUTS = ["tarball", "folder with tarball", "batches folder", "folder with batches folder"]


@pytest.mark.parametrize("layout", CIFAR_LAYOUTS)
def test_cifar10_layouts_give_exact_pixels_and_labels(tmp_path, cifar_batches, layout):
    batches_folder = write_cifar_folder(tmp_path / "extracted" / "cifar-10-batches-py", cifar_batches)
    (tmp_path / "download").mkdir()
    tarball = write_cifar_tarball(tmp_path / "download" / "cifar-10-python.tar.gz", batches_folder)
    spec = {
        "tarball": tarball,
        "folder with tarball": tarball.parent,
        "batches folder": batches_folder,
        "folder with batches folder": batches_folder.parent,
    }[layout]
    for split, names in [("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])]:
        dataset = load_dataset(str(spec), split)
        images, labels = all_items(dataset)
        assert images.dtype == torch.uint8 and images.shape == (IMAGES_PER_BATCH * len(names), 3, 32, 32)
        expected_hwc = np.concatenate([cifar_batches[name][0] for name in names])
        assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), expected_hwc)
        assert labels == [label for name in names for label in cifar_batches[name][1]]
        assert all(type(label) is int for label in labels)


def test_cifar10_pickled_by_python3_and_numpy2_loads(tmp_path, cifar_batches):
    def python3_pickle(batch):
        return pickle.dumps(batch, protocol=4)

    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", cifar_batches, python3_pickle)
    image, label = load_dataset(str(folder), "test")[1]
    assert np.array_equal(image.permute(1, 2, 0).numpy(), cifar_batches["test_batch"][0][1])
    assert label == cifar_batches["test_batch"][1][1]


def test_cifar10_batches_through_a_dataloader(tmp_path, cifar_batches):
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", cifar_batches)
    images, labels = next(iter(DataLoader(load_dataset(str(folder), "train"), batch_size=4)))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert labels.dtype == torch.int64
    assert labels.tolist() == cifar_batches["data_batch_1"][1] + cifar_batches["data_batch_2"][1][:1]


def test_cifar10_errors(tmp_path, cifar_batches):
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", cifar_batches)
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(folder), "train", size=64)
    assert_one_line_error(excinfo, "32x32", "size=64")

    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(folder), "train")
    assert_one_line_error(excinfo, "data_batch_3")
    assert len(load_dataset(str(folder), "test")) == IMAGES_PER_BATCH

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": [1, 2], b"labels": [0]}))
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(folder), "test")
    assert_one_line_error(excinfo, "test_batch", "not a CIFAR-10 batch")

    (folder / "test_batch").write_bytes(b"\x80\x02 truncated garbage")
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(folder), "test")
    assert_one_line_error(excinfo, "test_batch")


def test_tarball_other_than_cifar10_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with tarfile.open(tmp_path / "notes.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "notes.txt", arcname="notes.txt")
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(tmp_path / "notes.tar.gz"), "train")
    assert_one_line_error(excinfo, "notes.tar.gz", "cifar-10-python.tar.gz")


class ShellPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class ExecPayload(ShellPayload):
    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload_class", [ShellPayload, ExecPayload])
@pytest.mark.parametrize("container", ["folder", "tarball"])
def test_cifar10_pickle_that_would_run_code_is_refused_without_running(
    tmp_path, cifar_batches, payload_class, container
):
    control_marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(payload_class(control_marker)))
    assert control_marker.exists(), "the payload must be live for this test to prove anything"

    marker = tmp_path / "marker"
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", cifar_batches)
    evil_batch = {b"data": payload_class(marker), b"labels": [0]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(evil_batch, protocol=2))
    if container == "tarball":
        spec = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", folder)
    else:
        spec = folder
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(spec), "train")
    assert_one_line_error(excinfo, "data_batch_2", "only numpy arrays are allowed")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Downsampled ImageNet


def write_imagenet_npz(path, images_hwc, labels_1_based, **extra_arrays):
    np.savez(path, data=to_chw_rows(images_hwc), labels=np.asarray(labels_1_based), **extra_arrays)
    return path


def random_images(rng, count, side=32):
    return rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def test_imagenet32_folder_splits_order_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    train_files = {}
    for number in (10, 2, 1):  # numeric order 1, 2, 10 must win over the file names' sort order
        images, labels = random_images(rng, 2), rng.integers(1, 1001, 2)
        npz = tmp_path / f"train_data_batch_{number}.npz"
        write_imagenet_npz(npz, images, labels, mean=np.zeros(3072))
        train_files[number] = images, labels
    val_images, val_labels = random_images(rng, 3), np.array([1, 1000, 500])
    write_imagenet_npz(tmp_path / "val_data.npz", val_images, val_labels)

    images, labels = all_items(load_dataset(str(tmp_path), "train"))
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 32, 32)
    expected = np.concatenate([train_files[number][0] for number in (1, 2, 10)])
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), expected)
    assert labels == [int(label) - 1 for number in (1, 2, 10) for label in train_files[number][1]]

    images, labels = all_items(load_dataset(str(tmp_path), "test"))
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), val_images)
    assert labels == [0, 999, 499] and all(type(label) is int for label in labels)


def test_imagenet_single_file_holds_out_every_tenth_image(tmp_path):
    rng = np.random.default_rng(2)
    images_hwc = random_images(rng, 12)
    npz = write_imagenet_npz(tmp_path / "train_data_batch_1.npz", images_hwc, np.arange(1, 13))
    train, test = load_dataset(str(npz), "train"), load_dataset(str(npz), "test")
    test_images, test_labels = all_items(test)
    assert test_labels == [0, 10] and len(train) == 10
    assert np.array_equal(test_images.permute(0, 2, 3, 1).numpy(), images_hwc[[0, 10]])
    assert sorted(all_items(train)[1] + test_labels) == list(range(12))


def test_imagenet_size_is_read_from_the_files(tmp_path):
    images_hwc = random_images(np.random.default_rng(3), 2, side=8)
    write_imagenet_npz(tmp_path / "val_data.npz", images_hwc, [3, 4])
    image, label = load_dataset(str(tmp_path), "test", size=8)[1]
    assert image.shape == (3, 8, 8) and label == 3
    assert np.array_equal(image.permute(1, 2, 0).numpy(), images_hwc[1])
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(tmp_path), "test", size=32)
    assert_one_line_error(excinfo, "8x8", "size=8")


def test_imagenet_errors(tmp_path):
    rng = np.random.default_rng(4)
    write_imagenet_npz(tmp_path / "val_data.npz", random_images(rng, 2), [1, 2])
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(tmp_path), "train")
    assert_one_line_error(excinfo, "train_data_batch_<k>.npz", str(tmp_path))

    bad_labels = write_imagenet_npz(tmp_path / "zero_based.npz", random_images(rng, 2), [0, 1])
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(bad_labels), "test")
    assert_one_line_error(excinfo, "zero_based.npz", "1..1000")

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, data=np.array([{"not": "numbers"}], dtype=object), labels=np.array([1]))
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(pickled), "test")
    assert_one_line_error(excinfo, "pickled.npz")

    other_npz = tmp_path / "weights.npz"
    np.savez(other_npz, w=np.zeros(3))
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(other_npz), "test")
    assert_one_line_error(excinfo, "weights.npz")


# ------------------------------------------------------------------------------------------------
# Folders of images


def save_image(path, pixels_hwc, mode=None, **save_options):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels_hwc)
    (image.convert(mode) if mode else image).save(path, **save_options)
    return path


def three_stripes(width, height):
    """Red | green | blue vertical stripes, the green one the centre `height` columns."""
    pixels = np.zeros((height, width, 3), np.uint8)
    side = (width - height) // 2
    pixels[:, :side, 0] = 255
    pixels[:, side:side + height, 1] = 255
    pixels[:, side + height:, 2] = 255
    return pixels


@pytest.fixture
def image_folder(tmp_path):
    """root/train/{cats,dogs}, root/test/{birds,dogs} in mixed sizes and formats, plus noise files."""
    rng = np.random.default_rng(5)
    root = tmp_path / "photos"
    exact = random_images(rng, 1)[0]
    save_image(root / "train" / "cats" / "exact.png", exact)
    save_image(root / "train" / "cats" / "wide.JPG", random_images(rng, 1, 64)[0][:40])
    save_image(root / "train" / "cats" / "deep" / "tall.bmp", random_images(rng, 1, 64)[0][:, :48])
    save_image(root / "train" / "dogs" / "palette.gif", random_images(rng, 1, 50)[0], mode="P")
    save_image(root / "train" / "dogs" / "alpha.png", random_images(rng, 1, 40)[0], mode="RGBA")
    save_image(root / "train" / "dogs" / "gray.tiff", random_images(rng, 1, 33)[0], mode="L")
    save_image(root / "train" / "dogs" / "photo.webp", random_images(rng, 1, 70)[0])
    save_image(root / "train" / "dogs" / "stripes.png", three_stripes(64, 32))
    save_image(root / "train" / ".hidden" / "skip.png", exact)
    (root / "train" / "dogs" / "notes.txt").write_text("not an image")
    save_image(root / "test" / "birds" / "a.jpeg", random_images(rng, 1, 48)[0])
    save_image(root / "test" / "dogs" / "b.Png", random_images(rng, 1, 32)[0])
    (root / "test" / "dogs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return root, exact


def test_image_folder_with_splits_and_classes(image_folder):
    root, exact = image_folder
    train = load_dataset(str(root), "train")
    assert isinstance(train, ImageFolderDataset)
    assert train.classes == ["birds", "cats", "dogs"]  # union of both splits: labels agree across splits
    relative = [file.relative_to(root / "train").as_posix() for file in train.files]
    assert relative == ["cats/deep/tall.bmp", "cats/exact.png", "cats/wide.JPG", "dogs/alpha.png",
                        "dogs/gray.tiff", "dogs/palette.gif", "dogs/photo.webp", "dogs/stripes.png"]
    images, labels = all_items(train)
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    assert labels == [1, 1, 1, 2, 2, 2, 2, 2]
    assert torch.equal(images[1], torch.from_numpy(exact).permute(2, 0, 1))  # 32x32 passes bit-for-bit
    green = torch.zeros(3, 32, 32, dtype=torch.uint8)
    green[1] = 255
    assert torch.equal(images[7], green)  # centre crop of a 64x32 image, no resize needed

    test = load_dataset(str(root), "test", size=16)
    assert [file.name for file in test.files] == ["a.jpeg", "b.Png", "corrupt.png"]
    image, label = test[0]
    assert image.shape == (3, 16, 16) and label == 0
    assert test[1][1] == 2


def test_image_folder_resizes_shorter_side_then_crops_centre(tmp_path):
    save_image(tmp_path / "stripes.png", three_stripes(128, 64))
    save_image(tmp_path / "other.png", three_stripes(128, 64))
    image, label = ImageFolderDataset(tmp_path, "train", size=32)[0]
    assert label == 0
    centre = image[:, :, 2:30].int()  # away from the stripe edges, where bicubic rings
    assert (centre[1] == 255).all() and (centre[0] == 0).all() and (centre[2] == 0).all()


def test_corrupt_image_is_named_when_read(image_folder):
    root, _ = image_folder
    test = load_dataset(str(root), "test")
    with pytest.raises(DataError) as excinfo:
        test[2]
    assert_one_line_error(excinfo, root / "test" / "dogs" / "corrupt.png")


def test_folder_without_splits_holds_out_every_tenth_file(tmp_path):
    rng = np.random.default_rng(6)
    for i in range(12):
        save_image(tmp_path / f"{i:02d}.png", random_images(rng, 1)[0])
    train, test = load_dataset(str(tmp_path), "train"), load_dataset(str(tmp_path), "test")
    assert [file.name for file in test.files] == ["00.png", "10.png"]
    assert len(train) == 10 and not set(train.files) & set(test.files)
    assert all_items(test)[1] == [0, 0]


def eleven_images(folder):
    rng = np.random.default_rng(7)
    for i in range(11):
        save_image(folder / f"{i:02d}.png", random_images(rng, 1)[0])


def test_links_to_the_folder_itself_or_above_are_walked_once(tmp_path):
    """A `self -> .` link once turned 11 images into 405 train and 46 test records, and `up -> ..`
    into 13,491, with the same images in train and test."""
    images = tmp_path / "data" / "images"
    eleven_images(images)
    save_image(tmp_path / "data" / "elsewhere.png", random_images(np.random.default_rng(8), 1)[0])
    (images / "self").symlink_to(".")
    (images / "up").symlink_to("..")
    train, test = load_dataset(str(images), "train"), load_dataset(str(images), "test")
    assert [file.name for file in train.files + test.files] == [f"{i:02d}.png" for i in range(11) if i % 10] + ["00.png", "10.png"]
    assert all(file.parent == images for file in train.files + test.files)


def test_a_linked_folder_counts_once_and_links_elsewhere_are_followed(tmp_path):
    outside = tmp_path / "outside"
    eleven_images(outside)
    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "photos").symlink_to(outside, target_is_directory=True)
    (root / "cats" / "again").symlink_to(outside, target_is_directory=True)  # the same real folder again
    save_image(root / "dogs" / "dog.png", random_images(np.random.default_rng(12), 1)[0])
    train, test = load_dataset(str(root), "train"), load_dataset(str(root), "test")
    files = train.files + test.files
    assert len(files) == 12 and len({file.resolve() for file in files}) == 12
    assert [label for dataset in (train, test) for label in dataset.labels].count(1) == 1  # dogs: its own image


def test_an_image_in_both_train_and_test_is_refused(tmp_path):
    save_image(tmp_path / "train" / "a" / "x.png", random_images(np.random.default_rng(9), 1)[0])
    save_image(tmp_path / "test" / "a" / "y.png", random_images(np.random.default_rng(10), 1)[0])
    (tmp_path / "test" / "a" / "x.png").symlink_to(tmp_path / "train" / "a" / "x.png")
    for split in ("train", "test"):
        with pytest.raises(DataError) as excinfo:
            load_dataset(str(tmp_path), split)
        assert_one_line_error(excinfo, "x.png", "both train and test")


def test_a_broken_link_is_refused_not_skipped(tmp_path):
    eleven_images(tmp_path)
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(tmp_path), "train")
    assert_one_line_error(excinfo, "broken link", tmp_path / "gone.png")


def test_images_beside_class_folders_are_refused(tmp_path):
    """They once got label 0, the first class's."""
    rng = np.random.default_rng(11)
    for name in ("cats/a.png", "dogs/b.png", "loose.png"):
        save_image(tmp_path / name, random_images(rng, 1)[0])
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(tmp_path), "train")
    assert_one_line_error(excinfo, "1 image(s) lie directly in", "loose.png", "cats, dogs")


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(empty), "train")
    assert_one_line_error(excinfo, "no images", empty)

    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError):
        load_dataset(str(empty), "test")

    single = save_image(tmp_path / "single" / "only.png", np.zeros((32, 32, 3), np.uint8))
    assert len(load_dataset(str(single.parent), "test")) == 1
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(single.parent), "train")
    assert_one_line_error(excinfo, "1 image")


# ------------------------------------------------------------------------------------------------
# Data layouts: which folders are splits, which are classes


def images_in(folder, names, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        save_image(folder / name, random_images(rng, 1, 8)[0])


SYNSETS = ("n01440764", "n01443537", "n01484850")


def imagenet_layout(root, test_folder="val"):
    """ImageNet's own layout, three synsets: train/<synset>/ (6 images each), <test_folder>/<synset>/ (2 each)."""
    for k, synset in enumerate(SYNSETS):
        images_in(root / "train" / synset, [f"{synset}_{i}.JPEG" for i in range(6)], seed=k)
        images_in(root / test_folder / synset, [f"ILSVRC2012_val_{k}{i}.JPEG" for i in range(2)], seed=10 + k)
    return root


@pytest.mark.parametrize("test_folder", ["val", "valid", "validation", "test"])
def test_imagenet_layout_is_two_splits_of_its_synsets_not_two_classes(tmp_path, test_folder):
    """It once loaded as 18 training images of the classes ['train', 'val'], every 10th held out."""
    root = imagenet_layout(tmp_path / "imagenet", test_folder)
    train, test = load_dataset(str(root), "train", 8), load_dataset(str(root), "test", 8)
    assert train.classes == test.classes == list(SYNSETS)
    assert len(train) == 18 and all(file.parts[-3] == "train" for file in train.files)
    assert len(test) == 6 and all(file.parts[-3] == test_folder for file in test.files)
    assert train.labels == [0] * 6 + [1] * 6 + [2] * 6 and test.labels == [0, 0, 1, 1, 2, 2]
    assert [file.parent.name for file in test.files] == [SYNSETS[label] for label in test.labels]


def test_ffhq_flat_folder_is_unconditional_with_every_tenth_held_out(tmp_path):
    """FFHQ as most copies ship it: one flat folder of numbered images, no labels."""
    images_in(tmp_path / "ffhq", [f"{i:05d}.png" for i in range(20)])
    train, test = load_dataset(str(tmp_path / "ffhq"), "train", 8), load_dataset(str(tmp_path / "ffhq"), "test", 8)
    assert train.classes == [] and set(train.labels) == set(test.labels) == {0}
    assert [file.name for file in test.files] == ["00000.png", "00010.png"] and len(train) == 18


def test_ffhq_as_nvidia_ships_it_is_one_unconditional_set_not_a_class_per_shard(tmp_path):
    """images1024x1024/00000/00000.png ... : folders of numbered images, each named by its first
    image's number, are shards of one set; every 10th image of the whole set is held out."""
    for start in (0, 10, 20):
        images_in(tmp_path / "ffhq" / f"{start:05d}", [f"{i:05d}.png" for i in range(start, start + 10)], seed=start)
    train, test = load_dataset(str(tmp_path / "ffhq"), "train", 8), load_dataset(str(tmp_path / "ffhq"), "test", 8)
    assert train.classes == [] and set(train.labels) == set(test.labels) == {0}
    assert [file.name for file in test.files] == ["00000.png", "00010.png", "00020.png"] and len(train) == 27


@pytest.mark.parametrize("layout", [
    {"0": range(0, 5), "1": range(0, 5)},  # classes 0 and 1, each numbering its images from 0
    {"0": range(0, 5), "5": range(3, 8)},  # an image of folder 5 numbered below it
    {"00000": range(0, 5), "00005": range(5, 10), "cats": range(10, 15)},  # a folder not named by a number
])
def test_numbered_folders_that_are_not_shards_of_one_set_stay_classes(tmp_path, layout):
    for name, numbers in layout.items():
        images_in(tmp_path / "data" / name, [f"{i:05d}.png" for i in numbers])
    assert load_dataset(str(tmp_path / "data"), "train", 8).classes == sorted(layout)


def test_class_folders_without_splits_are_classes_even_one_named_train(tmp_path):
    """A folder of class folders holds out every 10th image; a class called `train` among others
    (CIFAR-100 has one) stays a class: only a root whose subfolders are all split names has splits."""
    for k, name in enumerate(("bus", "train", "tram")):
        images_in(tmp_path / "vehicles" / name, [f"{i}.png" for i in range(5)], seed=k)
    train = load_dataset(str(tmp_path / "vehicles"), "train", 8)
    test = load_dataset(str(tmp_path / "vehicles"), "test", 8)
    assert train.classes == ["bus", "train", "tram"]
    assert test.labels == [0, 2] and [f.parent.name for f in test.files] == ["bus", "tram"]  # files 0 and 10 of 15
    assert sorted(train.labels + test.labels) == [0] * 5 + [1] * 5 + [2] * 5


def test_a_root_holding_only_train_is_read_as_train_without_splits(tmp_path):
    for k, synset in enumerate(SYNSETS):
        images_in(tmp_path / "train" / synset, [f"{i}.png" for i in range(5)], seed=k)
    train, test = load_dataset(str(tmp_path), "train", 8), load_dataset(str(tmp_path), "test", 8)
    assert train.classes == list(SYNSETS) and len(train) + len(test) == 15 and len(test) == 2


@pytest.mark.parametrize("case", ["flat val with labels file", "flat train"])
def test_a_split_without_class_folders_beside_one_with_them_is_refused(tmp_path, case):
    """ImageNet's validation images as first shipped: 50,000 files in val/ and their labels in a text file."""
    root = imagenet_layout(tmp_path / "imagenet")
    flat = "val" if case == "flat val with labels file" else "train"
    shutil.rmtree(root / flat)
    images_in(root / flat, [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(4)])
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    for split in ("train", "test"):
        with pytest.raises(DataError) as excinfo:
            load_dataset(str(root), split, 8)
        assert_one_line_error(excinfo, root / flat, "without class folders", "not supported yet", f"{flat}/<class>/")


def test_split_folders_that_cannot_be_told_apart_are_refused(tmp_path):
    both = imagenet_layout(tmp_path / "both")
    images_in(both / "test", ["unlabelled.JPEG"])
    no_train = tmp_path / "no_train"
    images_in(no_train / "val" / "a", ["x.png"])
    extra = imagenet_layout(tmp_path / "extra")
    images_in(extra / "extras" / "a", ["x.png"])
    loose = tmp_path / "loose"
    images_in(loose / "train", ["a.png"])
    images_in(loose, ["b.png"])
    for root, fragments in ((both, ["test/, train/, val/", "more than one test split"]),
                            (no_train, ["no train/ beside val/"]),
                            (extra, ["split folders beside other folders", "move extras/ out"]),
                            (loose, ["1 image(s) lie directly in", "b.png", "beside the split folders train/"])):
        with pytest.raises(DataError) as excinfo:
            load_dataset(str(root), "train", 8)
        assert_one_line_error(excinfo, root, *fragments)


# Links and class folders: an image has one class, a class has images


@pytest.mark.parametrize("link", ["a/more -> ../b", "b/more -> ../a", "hard link a/x.png = b/x.png", "split"])
def test_an_image_reachable_from_two_class_folders_is_refused(tmp_path, link):
    """`a/more -> ../b` once gave b's images a's label, left b empty and made one class of two."""
    root = tmp_path / "data" / "train" if link == "split" else tmp_path / "data"
    images_in(root / "a", ["x.png", "y.png"], seed=1)
    images_in(root / "b", ["z.png", "w.png"], seed=2)
    if link == "split":  # the same inside each split of a root with splits
        images_in(tmp_path / "data" / "test" / "a", ["t.png"], seed=3)
        (root / "a" / "more").symlink_to("../b", target_is_directory=True)
    elif link.startswith("hard"):
        os.link(root / "a" / "x.png", root / "b" / "x.png")
    else:
        source, target = link.split(" -> ")
        (root / source).symlink_to(target, target_is_directory=True)
    for split in ("train", "test"):
        with pytest.raises(DataError) as excinfo:
            load_dataset(str(tmp_path / "data"), split, 8)
        assert_one_line_error(excinfo, "are the same image, in both class folders a and b")


@pytest.mark.parametrize("place", ["classes", "split"])
def test_an_empty_class_folder_and_a_dangling_class_link_are_refused(tmp_path, place):
    """A dangling link in place of a class folder once removed the class without a word."""
    root = tmp_path / "data" / "train" if place == "split" else tmp_path / "data"
    images_in(root / "a", ["x.png", "y.png"])
    if place == "split":
        images_in(tmp_path / "data" / "test" / "a", ["t.png"])
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images")
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(tmp_path / "data"), "train", 8)
    assert_one_line_error(excinfo, f"class folder {root / 'b'} holds no images")
    shutil.rmtree(root / "b")
    (root / "b").symlink_to(tmp_path / "unmounted" / "b", target_is_directory=True)
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(tmp_path / "data"), "train", 8)
    assert_one_line_error(excinfo, "broken link", root / "b", tmp_path / "unmounted" / "b")


def test_a_dangling_split_folder_link_is_refused(tmp_path):
    images_in(tmp_path / "data" / "train" / "a", ["x.png"])
    (tmp_path / "data" / "val").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(tmp_path / "data"), "train", 8)
    assert_one_line_error(excinfo, "broken link", tmp_path / "data" / "val")


# ------------------------------------------------------------------------------------------------
# Builtin photos


def test_builtin_photos_are_deterministic_and_split_by_photo():
    train = BuiltinPhotos("train", size=16, n_images=40)
    assert torch.equal(train.images, BuiltinPhotos("train", size=16, n_images=40).images)
    assert not torch.equal(train.images, BuiltinPhotos("train", size=16, n_images=40, seed=1).images)
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and type(label) is int

    test = load_dataset("builtin", "test", size=16)
    assert len(test) == 2000 and test.images.shape == (2000, 3, 16, 16)
    test_labels = {BUILTIN_PHOTOS.index(name) for name in BUILTIN_TEST_PHOTOS}
    assert set(test.labels.tolist()) == test_labels
    assert not set(train.labels.tolist()) & test_labels
    assert train.images.float().std() > 10  # real content, not a constant
    assert set(train.labels.tolist()) <= set(range(len(builtin_split_photos("train"))))  # contiguous classes


def test_builtin_train_crops_are_mirrored_half_the_time_and_test_crops_never():
    """The test crops are cut as before the mirroring existed (their random draws come first), so
    test bits/dim stay comparable; half the training crops, at random, are mirrored copies of a cut."""
    n = 400
    for split in ("test", "train"):
        photos = [Image.fromarray(builtin_photo(name)) for name in builtin_split_photos(split)]
        rng = np.random.default_rng([0, SPLITS.index(split)])  # the split's generator, as BuiltinPhotos seeds it
        cuts, _ = random_crops(photos, n, 16, rng)
        images = BuiltinPhotos(split, size=16, n_images=n).images
        mirrored = (images != cuts).flatten(1).any(1)
        assert torch.equal(images[mirrored], cuts[mirrored].flip(-1))
        if split == "test":
            assert not mirrored.any()
        else:
            assert 0.4 < mirrored.float().mean() < 0.6


def test_builtin_photos_are_distinct_rgb_photos():
    photos = {name: builtin_photo(name) for name in BUILTIN_PHOTOS}
    assert all(photo.dtype == np.uint8 and photo.shape[2:] == (3,) for photo in photos.values())
    for test_name in BUILTIN_TEST_PHOTOS:
        for train_name in set(BUILTIN_PHOTOS) - set(BUILTIN_TEST_PHOTOS):
            same_shape = photos[test_name].shape == photos[train_name].shape
            assert not (same_shape and np.array_equal(photos[test_name], photos[train_name]))


# ------------------------------------------------------------------------------------------------
# Arguments, paths and value ranges


def test_missing_path_wrong_format_and_bad_arguments(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(missing), "train")
    assert_one_line_error(excinfo, "not found", missing)

    text_file = tmp_path / "data.txt"
    text_file.write_text("hello")
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(text_file), "train")
    assert_one_line_error(excinfo, text_file, "builtin", "cifar-10-python.tar.gz", ".npz", "png")

    with pytest.raises(DataError) as excinfo:
        load_dataset("builtin", "validation")
    assert_one_line_error(excinfo, "validation", "train", "test")
    with pytest.raises(DataError) as excinfo:
        load_dataset("builtin", "train", size=0)
    assert_one_line_error(excinfo, "size")
    assert issubclass(DataError, ValueError)


def test_model_range_round_trip():
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    x = to_model_range(values)
    assert x.dtype == torch.float32 and x.shape == values.shape
    assert x.min() == -1 and x.max() == 1
    assert torch.allclose(x, values.float() / 127.5 - 1)
    assert torch.equal(to_uint8(x), values)
    near_zero_and_one = [0.4 / 127.5 - 1, 0.6 / 127.5 - 1]
    x = torch.tensor([-3.0, -1.0, 1.0, 3.0, *near_zero_and_one])
    assert to_uint8(x).tolist() == [0, 0, 255, 255, 0, 1]


# ------------------------------------------------------------------------------------------------
# Image modes and damaged files (policy: convert what has a meaning as 8-bit RGB, stop on the rest)


def folder_with(tmp_path, name, image):
    """A folder with `image` saved as `name` and a plain 8x8 image, so that `name` is test item 0."""
    folder = tmp_path / "modes"
    folder.mkdir(exist_ok=True)
    image.save(folder / name)
    save_image(folder / "zz_other.png", np.zeros((8, 8, 3), np.uint8))
    return folder


def read_only_item(folder):
    dataset = load_dataset(str(folder), "test", size=8)
    assert len(dataset) == 1
    image, _ = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    return image.permute(1, 2, 0).numpy().astype(int)  # (8, 8, 3)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    rgb = read_only_item(folder_with(tmp_path, "gray.png", Image.fromarray(gray)))
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], gray)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([0, 257, 1000, 32768, 40000, 65278, 65535, 128], np.uint16)
    sixteen_bit = np.tile(values, (8, 1))
    image = Image.fromarray(sixteen_bit)
    assert image.mode == "I;16"
    rgb = read_only_item(folder_with(tmp_path, "deep.png", image))
    expected = np.round(values / 257).astype(int)  # 0, 1, 4, 128, 156, 254, 255, 0
    assert expected.tolist() == [0, 1, 4, 128, 156, 254, 255, 0]
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], np.tile(expected, (8, 1)))


def test_32_bit_integer_image_is_read_as_16_bit_and_out_of_range_refused(tmp_path):
    values = np.tile(np.array([0, 257, 65535, 32768, 0, 0, 0, 0], np.int32), (8, 1))
    rgb = read_only_item(folder_with(tmp_path, "wide.tif", Image.fromarray(values)))
    assert rgb[0, :4, 1].tolist() == [0, 1, 255, 128]

    values[0, 0] = 70000
    Image.fromarray(values).save(tmp_path / "modes" / "wide.tif")
    with pytest.raises(DataError) as excinfo:
        read_only_item(tmp_path / "modes")
    assert_one_line_error(excinfo, tmp_path / "modes" / "wide.tif", "0..65535")


def test_float_image_is_refused_naming_it(tmp_path):
    folder = folder_with(tmp_path, "float.tif", Image.fromarray(np.full((8, 8), 0.5, np.float32)))
    with pytest.raises(DataError) as excinfo:
        read_only_item(folder)
    assert_one_line_error(excinfo, folder / "float.tif", "mode F")


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere, also under transparent pixels
    rgba[:, :4, 3] = 255  # opaque left half
    rgba[:, 4:6, 3] = 0  # transparent: white
    rgba[:, 6:, 3] = 128  # half: 200 * 128/255 + 255 * 127/255 in red, 255 * 127/255 elsewhere
    rgb = read_only_item(folder_with(tmp_path, "alpha.png", Image.fromarray(rgba)))
    assert (rgb[:, :4] == [200, 0, 0]).all()
    assert (rgb[:, 4:6] == 255).all()
    assert np.abs(rgb[:, 6:] - [227.6, 127, 127]).max() <= 1

    gray_alpha = Image.merge("LA", [Image.fromarray(rgba[..., 0]), Image.fromarray(rgba[..., 3])])
    rgb = read_only_item(folder_with(tmp_path, "alpha.png", gray_alpha))
    assert (rgb[:, :4] == 200).all() and (rgb[:, 4:6] == 255).all()


def test_palette_transparency_is_composited_over_white(tmp_path):
    palette_image = Image.new("P", (8, 8), 1)
    palette_image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette_image.paste(0, (0, 0, 4, 8))  # left half: index 0, declared transparent
    palette_image.info["transparency"] = 0
    folder = folder_with(tmp_path, "palette.png", palette_image)
    palette_image.save(folder / "palette.png", transparency=0)
    rgb = read_only_item(folder)
    assert (rgb[:, :4] == 255).all() and (rgb[:, 4:] == [10, 20, 30]).all()


def png_bytes(pixels_hwc):
    buffer = io.BytesIO()
    Image.fromarray(pixels_hwc).save(buffer, format="png")
    return buffer.getvalue()


DAMAGED_FILES = {
    "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "random.jpg": bytes(np.random.default_rng(7).integers(0, 256, 2000, dtype=np.uint8)),
    "truncated.png": png_bytes(np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:3000],
}


@pytest.mark.parametrize("name", DAMAGED_FILES)
def test_undecodable_image_stops_reading_naming_the_file(tmp_path, name):
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / name).write_bytes(DAMAGED_FILES[name])
    save_image(folder / "zz_fine.png", np.zeros((8, 8, 3), np.uint8))
    dataset = load_dataset(str(folder), "test", size=8)
    with pytest.raises(DataError) as excinfo:
        dataset[0]
    assert_one_line_error(excinfo, folder / name, "cannot read image")


def test_empty_image_file_is_refused_when_the_dataset_is_built(tmp_path):
    folder = tmp_path / "damaged"
    save_image(folder / "fine.png", np.zeros((8, 8, 3), np.uint8))
    (folder / "empty.png").write_bytes(b"")  # item 0: the test split
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(folder), "test", size=8)
    assert_one_line_error(excinfo, folder / "empty.png", "0 bytes")


@contextlib.contextmanager
def without_permissions(path):
    """`path` unreadable while the block runs (and removable by the test's cleanup after it)."""
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        yield
    finally:
        path.chmod(mode)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_folder_and_file_are_named(tmp_path):
    folder = tmp_path / "locked"
    save_image(folder / "a.png", np.zeros((8, 8, 3), np.uint8))
    save_image(folder / "b.png", np.zeros((8, 8, 3), np.uint8))
    with without_permissions(folder), pytest.raises(DataError) as excinfo:
        load_dataset(str(folder), "train", size=8)
    assert_one_line_error(excinfo, folder, "permission denied")
    with without_permissions(folder / "a.png"), pytest.raises(DataError) as excinfo:
        load_dataset(str(folder), "test", size=8)[0]
    assert_one_line_error(excinfo, folder / "a.png")

    locked_subfolder = save_image(folder / "more" / "c.png", np.zeros((8, 8, 3), np.uint8)).parent
    with without_permissions(locked_subfolder), pytest.raises(DataError) as excinfo:
        load_dataset(str(folder), "train", size=8)
    assert_one_line_error(excinfo, locked_subfolder, "Permission denied")


# ------------------------------------------------------------------------------------------------
# CIFAR-10 and ImageNet files of the wrong format


def test_truncated_cifar10_tarball_is_named(tmp_path, cifar_batches):
    folder = write_cifar_folder(tmp_path / "extracted" / "cifar-10-batches-py", cifar_batches)
    whole = write_cifar_tarball(tmp_path / "whole.tar.gz", folder).read_bytes()
    truncated = tmp_path / "cifar-10-python.tar.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(truncated), "test")
    assert_one_line_error(excinfo, truncated, "cannot read tarball")


CIFAR_BATCHES_OF_THE_WRONG_FORMAT = {
    "a list": [np.zeros((2, 3072), np.uint8), [0, 1]],
    "str keys": {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]},
    "wrong width": {b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]},
    "images as HWC": {b"data": np.zeros((2, 32, 32, 3), np.uint8), b"labels": [0, 1]},
    "float data": {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
    "label 10": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
    "negative label": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 0]},
    "fewer labels": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
}


@pytest.mark.parametrize("case", CIFAR_BATCHES_OF_THE_WRONG_FORMAT)
def test_cifar10_batch_of_the_wrong_format_is_named(tmp_path, cifar_batches, case):
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", cifar_batches)
    (folder / "test_batch").write_bytes(official_cifar_pickle(CIFAR_BATCHES_OF_THE_WRONG_FORMAT[case]))
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(folder), "test")
    assert_one_line_error(excinfo, folder / "test_batch", "not a CIFAR-10 batch")


IMAGENET_FILES_OF_THE_WRONG_FORMAT = {
    "float data": dict(data=np.zeros((20, 3072), np.float32), labels=np.ones(20, np.int64)),
    "images as NCHW": dict(data=np.zeros((20, 3, 32, 32), np.uint8), labels=np.ones(20, np.int64)),
    "rows not 3*S*S": dict(data=np.zeros((20, 3000), np.uint8), labels=np.ones(20, np.int64)),
    "fewer labels": dict(data=np.zeros((20, 3072), np.uint8), labels=np.ones(19, np.int64)),
    "float labels": dict(data=np.zeros((20, 3072), np.uint8), labels=np.ones(20, np.float32)),
    "labels as a matrix": dict(data=np.zeros((20, 3072), np.uint8), labels=np.ones((20, 1), np.int64)),
    "no labels": dict(data=np.zeros((20, 3072), np.uint8)),
}


@pytest.mark.parametrize("case", IMAGENET_FILES_OF_THE_WRONG_FORMAT)
def test_imagenet_file_of_the_wrong_format_is_named(tmp_path, case):
    npz = tmp_path / "val_data.npz"
    np.savez(npz, **IMAGENET_FILES_OF_THE_WRONG_FORMAT[case])
    for spec in (npz, tmp_path):
        with pytest.raises(DataError) as excinfo:
            load_dataset(str(spec), "test")
        assert_one_line_error(excinfo, npz)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"\x93NUMPY not an npz"])
def test_imagenet_file_that_is_not_an_npz_is_named(tmp_path, content):
    npz = tmp_path / "train_data_batch_1.npz"
    npz.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        load_dataset(str(tmp_path), "train")
    assert_one_line_error(excinfo, npz, "cannot read downsampled-ImageNet file")


def test_a_stored_data_path_is_absolute_with_home_expanded_and_builtin_stays_a_name(tmp_path, monkeypatch):
    """The one rule for the data paths runs and code databases store (data.datasets.absolute_spec)."""
    from pipelines.data.datasets import absolute_spec

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("~/photos") == str(tmp_path.resolve() / "photos")
    assert absolute_spec("photos") == str(tmp_path.resolve() / "photos")
    assert absolute_spec("builtin") == "builtin"
