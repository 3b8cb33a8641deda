"""A resumed run checks that its data is the run's own: an image folder by the fingerprint of its
files (names, sizes, modification times) beside its record counts, a code database as before.
Other images under the same path are refused naming both paths; the same images moved resume."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pipelines.data.datasets import files_fingerprint, load_dataset
from pipelines.store import run_files
from test_training import TRAINERS, options

pytestmark = pytest.mark.usefixtures("one_thread")


def twelve_images(folder, seed, side=8, mtime=1_700_000_000):
    """12 random PNGs 00.png..11.png of side x side pixels in `folder`, all modified at `mtime`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(12):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        os.utime(path, (mtime, mtime))
    return folder


def train_pixels(data, out, steps, resume=False):
    """The tiny pixel run of tests/test_training.py on the image folder `data` (relative or not)."""
    _, train, config_class, _ = TRAINERS["pixel"]
    fields = {**options("pixel", out, out, steps=steps), "data": None if data is None else str(data), "resume": resume}
    return train(config_class(**fields))


def stored(run_dir):
    progress = run_files.read_progress(run_dir)
    return progress["train_config"]["data"], progress["data"], progress["step"]


@pytest.mark.parametrize("other", ["other images of the same names and times", "the same bytes, other times"])
def test_a_relative_data_path_resumed_elsewhere_on_other_images_is_refused(tmp_path, monkeypatch, other):
    """Trained in X on `--data data` (12 images), resumed in Y with the same words naming 12 other
    images: it once trained on them without a word and recorded Y's path as the run's."""
    x, y, run_dir = tmp_path / "x", tmp_path / "y", tmp_path / "run"
    twelve_images(x / "data", seed=0)
    if other.startswith("other images"):  # only their sizes tell them apart
        twelve_images(y / "data", seed=1, side=9)
    else:  # touched: only the modification times tell them apart
        shutil.copytree(x / "data", y / "data")
        for path in (y / "data").iterdir():
            os.utime(path, (1_800_000_000, 1_800_000_000))
    monkeypatch.chdir(x)
    train_pixels("data", run_dir, steps=1)
    before = stored(run_dir)
    assert before[0] == str(x / "data") and before[1]["train_records"] == 10 and "train_fingerprint" in before[1]
    monkeypatch.chdir(y)
    with pytest.raises(ValueError) as excinfo:
        train_pixels("data", run_dir, steps=2, resume=True)
    message = str(excinfo.value)
    assert "\n" not in message and f"--data {y / 'data'} is not the data the run in {run_dir}" in message
    assert f"({x / 'data'})" in message and "its train files differ (names, sizes or modification times)" in message
    assert stored(run_dir) == before  # nothing trained, the run's path kept


def test_the_same_images_moved_resume_and_the_run_records_their_new_path(tmp_path, monkeypatch):
    first, moved, run_dir = tmp_path / "first" / "data", tmp_path / "moved" / "images", tmp_path / "run"
    twelve_images(first, seed=0)
    monkeypatch.chdir(tmp_path)
    train_pixels("first/data", run_dir, steps=1)
    identity = stored(run_dir)[1]
    moved.parent.mkdir()
    first.rename(moved)
    train_pixels("moved/images", run_dir, steps=2, resume=True)
    assert stored(run_dir) == (str(moved), identity, 2)


def test_a_run_that_stored_only_record_counts_resumes_and_stores_the_fingerprint(tmp_path):
    """Runs made before the fingerprint was kept resume unchecked on it, and keep it from then on."""
    data, run_dir = twelve_images(tmp_path / "data", seed=0), tmp_path / "run"
    train_pixels(data, run_dir, steps=1)
    progress_file = run_files.state_dir(run_dir) / run_files.PROGRESS_FILE
    progress = json.loads(progress_file.read_text())
    fingerprinted = progress["data"]
    progress["data"] = {"train_records": 10, "test_records": 2}
    progress_file.write_text(json.dumps(progress))
    train_pixels(None, run_dir, steps=2, resume=True)
    assert stored(run_dir) == (str(data), fingerprinted, 2)


def test_the_fingerprint_reads_names_sizes_and_times_not_contents(tmp_path):
    """Same names, sizes and times: the same fingerprint, whatever the bytes and wherever the folder;
    a file renamed, resized or touched changes it. Each split has its own."""
    data = twelve_images(tmp_path / "a" / "data", seed=0)
    train, test = load_dataset(str(data), "train", 8), load_dataset(str(data), "test", 8)
    assert train.fingerprint != test.fingerprint
    copy = shutil.copytree(data, tmp_path / "b" / "copy")  # copytree keeps the times
    (copy / "05.png").write_bytes(bytes(reversed((copy / "05.png").read_bytes())))
    os.utime(copy / "05.png", (1_700_000_000, 1_700_000_000))
    assert load_dataset(str(copy), "train", 8).fingerprint == train.fingerprint
    changes = {"renamed": lambda: (copy / "05.png").rename(copy / "05b.png"),
               "resized": lambda: (copy / "05.png").write_bytes((copy / "05.png").read_bytes() + b"\0"),
               "touched": lambda: os.utime(copy / "05.png", (1_700_000_001, 1_700_000_001))}
    for name, change in changes.items():
        shutil.rmtree(copy)
        shutil.copytree(data, copy)
        change()
        assert load_dataset(str(copy), "train", 8).fingerprint != train.fingerprint, name
    assert files_fingerprint(tmp_path, {}) == files_fingerprint(data, {})  # no files, nothing of the folder


def test_one_file_sources_are_fingerprinted_by_name_size_and_time(tmp_path):
    """A downsampled-ImageNet .npz (and a CIFAR-10 tarball, read the same way) gets the fingerprint of
    the file it was read from: another file of the same record count is told apart."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "imagenet.npz", data=rng.integers(0, 256, (20, 3 * 8 * 8), dtype=np.uint8),
                 labels=np.arange(1, 21))
        os.utime(tmp_path / name / "imagenet.npz", (1_700_000_000, 1_700_000_000))
    a, b = (load_dataset(str(tmp_path / name / "imagenet.npz"), "train", 8) for name in ("a", "b"))
    assert len(a) == len(b) == 18 and a.fingerprint == b.fingerprint  # the same name, size and time
    os.utime(tmp_path / "b" / "imagenet.npz", (1_700_000_002, 1_700_000_002))
    assert load_dataset(str(tmp_path / "b" / "imagenet.npz"), "train", 8).fingerprint != a.fingerprint


def test_an_extraction_rerun_on_other_files_of_the_same_count_is_refused(tiny_pipeline, tmp_path):
    """A code database records its images' fingerprint: rerun (or resumed) on other files under the
    same path, of the same count, the extraction is refused in one line instead of mixing them;
    the same files again find the database complete."""
    from pipelines.infer.extract import extract_with_vqvae
    from pipelines.store.codes import CodeStoreError, read_metadata

    images, out = tmp_path / "images", tmp_path / "codes.lmdb"
    shutil.copytree(tiny_pipeline / "images", images)
    extract_with_vqvae(tiny_pipeline / "vqvae", str(images), out)
    assert read_metadata(out)["source"]["fingerprint"] == load_dataset(str(images), "train", 16).fingerprint
    extract_with_vqvae(tiny_pipeline / "vqvae", str(images), out)  # the same files: complete, nothing to do
    first = sorted((images / "train" / "class0").iterdir())[0]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(first)  # another image under the same name
    with pytest.raises(CodeStoreError, match="was made by a different job: source"):
        extract_with_vqvae(tiny_pipeline / "vqvae", str(images), out)
