"""The code database: round trip, DataLoader workers, resume after SIGKILL, map growth, refusals."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import torch
from torch.utils.data import DataLoader

from pipelines.codes import (
    META_KEY, CodeDataset, CodeStoreError, CodeWriter, extract_codes, read_metadata, record_key,
)
from pipelines.data import ImageTensorDataset

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 40


def make_plan(**changes) -> dict:
    plan = dict(top_shape=(2, 2), bottom_shape=(4, 4), top_codes=5, bottom_codes=300, n_classes=3,
                vqvae_sha256="ab" * 32, image_size=8, source={"data": "random", "split": "train"})
    return {**plan, **changes}


def make_dataset(n_images: int = N_IMAGES) -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 8, 8), dtype=torch.uint8, generator=generator)
    return ImageTensorDataset(images, torch.arange(n_images) % 3)


def fake_encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes that are a fixed function of the pixels; bottom codes go past 255 to need uint16."""
    top = images[:, 0, ::4, ::4].long() % 5  # (B, 2, 2)
    bottom = (images[:, 1, ::2, ::2].long() + images[:, 2, ::2, ::2].long()) % 300  # (B, 4, 4)
    return top, bottom


def expected_item(dataset, index: int):
    image, label = dataset[index]
    top, bottom = fake_encode(image[None])
    return top[0], bottom[0], label


def assert_holds_dataset(path, dataset) -> None:
    codes = CodeDataset(path)
    assert len(codes) == len(dataset)
    for index in range(len(dataset)):
        top, bottom, label = codes[index]
        want_top, want_bottom, want_label = expected_item(dataset, index)
        assert top.dtype == bottom.dtype == label.dtype == torch.int64
        assert torch.equal(top, want_top) and torch.equal(bottom, want_bottom) and label.item() == want_label


@pytest.fixture
def complete_db(tmp_path):
    path = tmp_path / "codes.lmdb"
    extract_codes(fake_encode, make_dataset(), path, make_plan(), batch_size=8, progress=False)
    return path


def record_bytes(label: int, top_codes: list[int], bottom_codes: list[int]) -> bytes:
    """The record format spelled out: int32 label, then uint16 codes, all little-endian."""
    return label.to_bytes(4, "little") + b"".join(code.to_bytes(2, "little") for code in top_codes + bottom_codes)


def rewrite(path, key: bytes, value: bytes | None) -> None:
    """Replaces (or with None deletes) one record, as damage or a foreign writer would."""
    with lmdb.open(str(path), subdir=True) as env, env.begin(write=True) as txn:
        if value is None:
            txn.delete(key)
        else:
            txn.put(key, value)


def rewrite_metadata(path, **changes) -> None:
    with lmdb.open(str(path), subdir=True, readonly=True) as env, env.begin() as txn:
        metadata = json.loads(txn.get(META_KEY))
    rewrite(path, META_KEY, json.dumps({**metadata, **changes}).encode())


def test_write_then_read_gives_the_same_codes_and_labels(complete_db):
    top, bottom, label = expected_item(make_dataset(), 1)
    with lmdb.open(str(complete_db), subdir=True, readonly=True, lock=False) as env, env.begin() as txn:
        assert txn.get(record_key(1)) == record_bytes(label, top.flatten().tolist(), bottom.flatten().tolist())
    assert_holds_dataset(complete_db, make_dataset())
    metadata = read_metadata(complete_db)
    assert metadata == {"format": "pixelsnail-codes", "format_version": 1, "count": N_IMAGES,
                        **json.loads(json.dumps(make_plan()))}


def test_two_datasets_on_one_path_read_in_one_process(complete_db):
    first = CodeDataset(complete_db)
    first[0]
    second = CodeDataset(complete_db)
    assert torch.equal(first[3][1], second[3][1])
    assert read_metadata(complete_db)["count"] == N_IMAGES


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_every_record(complete_db, context):
    codes = CodeDataset(complete_db)
    codes[0]  # the parent holds the database open when it forks
    loader = DataLoader(codes, batch_size=8, num_workers=2, multiprocessing_context=context)
    tops, bottoms, labels = (torch.cat(parts) for parts in zip(*loader))
    dataset = make_dataset()
    want = [torch.stack(parts) for parts in zip(*(expected_item(dataset, i)[:2] for i in range(N_IMAGES)))]
    assert torch.equal(tops, want[0]) and torch.equal(bottoms, want[1])
    assert torch.equal(labels, dataset.labels)


KILLED_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
from test_codes import fake_encode, make_dataset, make_plan
from pipelines.codes import extract_codes

calls = 0
def encode_then_hang(images):
    global calls
    calls += 1
    if calls == 3:  # two batches are committed by now
        print("hanging", flush=True)
        time.sleep(60)
    return fake_encode(images)

extract_codes(encode_then_hang, make_dataset(), {out!r}, make_plan(), batch_size=4, progress=False)
"""


def test_killed_extraction_resumes_to_every_record_once(tmp_path):
    out = tmp_path / "codes.lmdb"
    script = KILLED_RUN.format(tests=str(ROOT / "tests"), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "hanging"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with pytest.raises(CodeStoreError, match="incomplete: extraction did not finish"):
        read_metadata(out)

    encoded = []
    def counting_encode(images):
        encoded.append(len(images))
        return fake_encode(images)

    assert extract_codes(counting_encode, make_dataset(), out, make_plan(), batch_size=4, progress=False) == N_IMAGES
    assert sum(encoded) == N_IMAGES - 8  # continued after the two committed batches
    with lmdb.open(str(out), subdir=True, readonly=True, lock=False) as env, env.begin() as txn:
        keys = list(txn.cursor().iternext(values=False))
    assert keys == [record_key(i) for i in range(N_IMAGES)] + [b"__meta__", b"__plan__"]
    assert_holds_dataset(out, make_dataset())


def test_map_grows_when_full(tmp_path):
    out = tmp_path / "codes.lmdb"
    dataset = make_dataset(400)  # 400 records of 44 bytes: several times the first map
    extract_codes(fake_encode, dataset, out, make_plan(), batch_size=64, progress=False, map_size=16384)
    assert (out / "data.mdb").stat().st_size > 16384
    assert_holds_dataset(out, dataset)


def test_complete_database_with_the_same_plan_is_left_alone(complete_db):
    def must_not_encode(images):
        raise AssertionError("a complete database was extracted again")

    assert extract_codes(must_not_encode, make_dataset(), complete_db, make_plan(), progress=False) == N_IMAGES


@pytest.mark.parametrize("complete", [True, False])
def test_a_different_job_is_refused(complete_db, complete):
    if not complete:
        rewrite(complete_db, META_KEY, None)
    with pytest.raises(CodeStoreError, match="made by a different job: vqvae_sha256"):
        extract_codes(fake_encode, make_dataset(), complete_db, make_plan(vqvae_sha256="cd" * 32), progress=False)


def test_records_that_are_not_a_prefix_are_refused(complete_db):
    rewrite(complete_db, META_KEY, None)
    rewrite(complete_db, record_key(5), None)
    with pytest.raises(CodeStoreError, match="where record 5 should be"):
        extract_codes(fake_encode, make_dataset(), complete_db, make_plan(), progress=False)


def test_out_path_that_is_not_a_database_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(CodeStoreError, match="exists and is not an LMDB database"):
        extract_codes(fake_encode, make_dataset(), tmp_path / "photos", make_plan(), progress=False)


def test_reader_refuses_missing_and_non_lmdb_paths(tmp_path):
    with pytest.raises(CodeStoreError, match="code database not found"):
        read_metadata(tmp_path / "nowhere")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CodeStoreError, match="not an LMDB database"):
        CodeDataset(tmp_path / "folder")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(b"\x01" * 20000)
    with pytest.raises(CodeStoreError, match="not a readable LMDB database"):
        read_metadata(tmp_path / "junk")


def test_reader_refuses_a_foreign_lmdb(tmp_path):
    with lmdb.open(str(tmp_path / "other"), subdir=True) as env, env.begin(write=True) as txn:
        txn.put(b"image-0", b"\x00" * 10)
    with pytest.raises(CodeStoreError, match="not a code database: it has no __meta__"):
        read_metadata(tmp_path / "other")


@pytest.mark.parametrize("changes, message", [
    pytest.param({"format": "imagenet-lmdb"}, "not a code database: its __meta__ has format 'imagenet-lmdb'", id="format"),
    pytest.param({"format_version": 2}, "format_version 2, newer than this code reads", id="newer-version"),
    pytest.param({"count": 41}, "holds 40 records but its metadata says 41", id="count"),
])
def test_reader_refuses_bad_metadata(complete_db, changes, message):
    rewrite_metadata(complete_db, **changes)
    with pytest.raises(CodeStoreError, match=message):
        CodeDataset(complete_db)


def test_reader_refuses_an_incomplete_database(complete_db):
    rewrite(complete_db, META_KEY, None)
    with pytest.raises(CodeStoreError, match="incomplete: extraction did not finish; re-run extract_codes.py"):
        CodeDataset(complete_db)


def record_with(label: int, top_code: int, bottom_code: int) -> bytes:
    return record_bytes(label, [top_code] * 4, [bottom_code] * 16)


@pytest.mark.parametrize("value, message", [
    pytest.param(record_with(0, 0, 0)[:-2], "holds 42 bytes, expected 44", id="truncated"),
    pytest.param(record_with(0, 0, 300), "bottom code 300 >= codebook size 300", id="bottom-code"),
    pytest.param(record_with(0, 5, 0), "top code 5 >= codebook size 5", id="top-code"),
    pytest.param(record_with(3, 0, 0), r"label 3 outside \[0, 3\)", id="label"),
])
def test_reader_refuses_a_damaged_record_naming_its_key(complete_db, value, message):
    rewrite(complete_db, record_key(7), value)
    codes = CodeDataset(complete_db)
    codes[6]
    with pytest.raises(CodeStoreError, match=f"record 7 \\(key 0000000000000007\\) .*{message}"):
        codes[7]


def test_writer_refuses_a_key_twice(tmp_path):
    with CodeWriter(tmp_path / "codes.lmdb") as writer:
        writer.put_many([(record_key(0), b"x")])
        with pytest.raises(CodeStoreError, match="holds key 0000000000000000 already"):
            writer.put_many([(record_key(1), b"y"), (record_key(0), b"z")])
        assert writer.entries() == 1  # the failed batch left nothing behind


def run_script(*args):
    return subprocess.run([sys.executable, "scripts/extract_codes.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_script_help():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    assert "--vqvae" in result.stdout and "--out" in result.stdout


def test_script_extracts_a_tiny_vqvae_and_resumes_nothing_when_done(tmp_path):
    from PIL import Image

    from pipelines.checkpoint import save_checkpoint
    from pipelines.data import load_dataset, to_model_range
    from vqvae import VQVAE2, VQVAE2Config

    for k in range(12):
        folder = tmp_path / "images" / ("cats" if k % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
        Image.fromarray(pixels.numpy()).save(folder / f"{k:02d}.png")
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(top_codes=8, bottom_codes=300, code_dim=4, channels=8, res_channels=4,
                                n_res_blocks=1)).eval()
    save_checkpoint(tmp_path / "vqvae" / "model.safetensors", model.state_dict(), "vqvae2", model.config, image_size=32)
    out = tmp_path / "codes.lmdb"
    args = ["--vqvae", str(tmp_path / "vqvae"), "--data", str(tmp_path / "images"), "--out", str(out), "--batch-size", "4"]

    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"wrote 10 records to {out}"
    codes = CodeDataset(out)
    assert codes.metadata["top_shape"] == [4, 4] and codes.metadata["bottom_shape"] == [8, 8]
    assert codes.metadata["n_classes"] == 2 and codes.metadata["bottom_codes"] == 300
    images = load_dataset(str(tmp_path / "images"), "train", 32)
    with torch.no_grad():
        top, bottom = model.encode(to_model_range(torch.stack([images[i][0] for i in range(10)])))
    assert torch.equal(torch.stack([codes[i][0] for i in range(10)]), top)
    assert torch.equal(torch.stack([codes[i][1] for i in range(10)]), bottom)
    assert [codes[i][2].item() for i in range(10)] == images.labels

    again = run_script(*args)
    assert again.returncode == 0, again.stderr
    assert "is complete already" in again.stdout
    other_split = run_script(*args, "--split", "test")
    assert other_split.returncode == 2 and "made by a different job" in other_split.stderr
