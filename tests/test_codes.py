"""The code database: round trip, DataLoader workers, resume after SIGKILL and a full disk, map
growth, refusals."""

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
import torch
from torch.utils.data import DataLoader

from launch import drain, launch_command, run_in_process
from pipelines.cli import run
from pipelines.data.datasets import ImageTensorDataset
from pipelines.infer.extract import extract_codes, write_codes
from pipelines.store.codes import (META_KEY, PLAN_KEY, CodeDataset, CodeStoreError, CodeWriter, read_metadata,
                                   record_key, record_size)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # scripts import this checkout's packages
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
    codes = b"".join(code.to_bytes(2, "little") for code in top_codes + bottom_codes)
    return label.to_bytes(4, "little", signed=True) + codes


def rewrite(path, key: bytes, value: bytes | None) -> None:
    """Replaces (or with None deletes) one record, as damage or a foreign writer would."""
    with lmdb.open(str(path), subdir=True) as env, env.begin(write=True) as txn:
        if value is None:
            txn.delete(key)
        else:
            txn.put(key, value)


def stored_items(path) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of an LMDB database, in key order."""
    with lmdb.open(str(path), subdir=True, readonly=True, lock=False) as env, env.begin() as txn:
        return list(txn.cursor().iternext())


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


def indexed_batches(n_records: int, batch_size: int = 100):
    """Batches of (labels, top, bottom) codes whose bottom grid spells the record's index."""
    for start in range(0, n_records, batch_size):
        index = torch.arange(start, min(start + batch_size, n_records))
        yield indexed_codes(index)


def indexed_codes(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label, top (B, 2, 2) and bottom (B, 4, 4) codes of records `index`; index = bottom[0, 0] + 300 * bottom[0, 1]."""
    top = (index[:, None, None] + torch.arange(4).reshape(1, 2, 2)) % 5
    bottom = (index[:, None, None] * 7 + torch.arange(16).reshape(1, 4, 4)) % 300
    bottom[:, 0, 0], bottom[:, 0, 1] = index % 300, index // 300
    return index % 3, top, bottom


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_every_record_epoch_after_epoch(tmp_path, context):
    n_records, epochs = 2000, 3
    path = tmp_path / "codes.lmdb"
    assert write_codes(path, make_plan(), indexed_batches(n_records)) == n_records
    codes = CodeDataset(path)
    codes[0]  # the parent holds the database open when it forks
    loader = DataLoader(codes, batch_size=32, shuffle=True, num_workers=2, multiprocessing_context=context,
                        persistent_workers=True, generator=torch.Generator().manual_seed(0))
    for epoch in range(epochs):
        orders = []
        for top, bottom, label in loader:
            index = bottom[:, 0, 0] + 300 * bottom[:, 0, 1]
            want_label, want_top, want_bottom = indexed_codes(index)
            assert torch.equal(top, want_top) and torch.equal(bottom, want_bottom) and torch.equal(label, want_label)
            orders.append(index)
        order = torch.cat(orders)
        assert sorted(order.tolist()) == list(range(n_records)), f"epoch {epoch}: not every record exactly once"
        assert not torch.equal(order, torch.arange(n_records))  # shuffled: random reads, not a scan


def test_write_codes_refuses_an_existing_path(complete_db):
    with pytest.raises(CodeStoreError, match="exists already"):
        write_codes(complete_db, make_plan(), indexed_batches(4))


KILLED_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
from test_codes import fake_encode, make_dataset, make_plan
from pipelines.infer.extract import extract_codes

def slow_encode(images):
    if not slow_encode.started:
        print("encoding", flush=True)
        slow_encode.started = True
    time.sleep(0.004)
    return fake_encode(images)

slow_encode.started = False
extract_codes(slow_encode, make_dataset({n_images}), {out!r}, make_plan(), batch_size=2, progress=False)
"""


def committed_records(path, reference: dict) -> int:
    """The number of records in an interrupted database, after checking that they are exactly keys
    0..k-1 beside __plan__, each byte for byte as an uninterrupted extraction wrote it."""
    items = stored_items(path)
    assert items[-1] == (PLAN_KEY, reference[PLAN_KEY])
    records = items[:-1]
    assert [key for key, _ in records] == [record_key(i) for i in range(len(records))]
    assert all(value == reference[key] for key, value in records)
    return len(records)


def test_killed_extraction_resumes_to_every_record_once(tmp_path):
    """SIGKILL three times at random (seeded) moments, each run resuming the previous one's database;
    then a last run completes it, equal byte for byte to an uninterrupted extraction."""
    n_images = 400  # 200 transactions of 2 records, at least 4 ms each: the run outlasts the kills
    uninterrupted = tmp_path / "uninterrupted.lmdb"
    extract_codes(fake_encode, make_dataset(n_images), uninterrupted, make_plan(), batch_size=2, progress=False)
    reference = dict(stored_items(uninterrupted))
    out = tmp_path / "codes.lmdb"
    script = KILLED_RUN.format(tests=str(ROOT / "tests"), out=str(out), n_images=n_images)
    rng = random.Random(0)
    delays = [rng.uniform(0.05, 0.25) for _ in range(3)]  # seconds after the first encode call
    progress = []
    for delay in delays:
        child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            while (line := child.stdout.readline()) not in ("encoding\n", ""):
                assert "resuming after" in line, line
            assert line == "encoding\n"
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        with pytest.raises(CodeStoreError, match="incomplete: extraction did not finish"):
            read_metadata(out)
        progress.append(committed_records(out, reference))
    assert 0 < progress[0] <= progress[1] <= progress[2] < n_images, progress

    encoded = []
    def counting_encode(images):
        encoded.append(len(images))
        return fake_encode(images)

    assert extract_codes(counting_encode, make_dataset(n_images), out, make_plan(), batch_size=2,
                         progress=False) == n_images
    assert sum(encoded) == n_images - progress[-1]  # continued after the last committed batch
    assert stored_items(out) == stored_items(uninterrupted)


KILLED_LAUNCH = """
import os, sys, time
sys.path.insert(0, {tests!r})
from accelerate import PartialState
from test_codes import fake_encode, make_dataset, make_plan
from pipelines.infer.extract import extract_codes

state = PartialState(cpu=True)

def slow_encode(images):
    if not slow_encode.started:
        sys.stdout.write(f"encoding rank {{state.process_index}} pid {{os.getpid()}}\\n")  # one write: lines do not mix
        sys.stdout.flush()
        slow_encode.started = True
    time.sleep(0.004)
    return fake_encode(images)

slow_encode.started = False
extract_codes(slow_encode, make_dataset({n_images}), {out!r}, make_plan(), batch_size=2, progress=False,
              processes=state)
"""


def start_launch(script):
    """Launches `script` on two CPU processes; -> (the launcher, {rank: pid}) once both encode."""
    launcher = subprocess.Popen(launch_command(2, str(script)), cwd=ROOT, env=SCRIPT_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    pids = {}
    while len(pids) < 2:
        line = launcher.stdout.readline()
        if not line:
            os.killpg(launcher.pid, signal.SIGKILL)
            pytest.fail("the launch ended before both processes encoded")
        for rank, pid in re.findall(r"encoding rank (\d+) pid (\d+)", line):
            pids[int(rank)] = int(pid)
    drain(launcher.stdout)  # the test waits on the launcher from here on
    return launcher, pids


def test_a_sigkill_of_either_process_leaves_whole_rounds_and_a_relaunch_completes(tmp_path):
    """Two processes encode, process 0 writes: SIGKILL process 1, then (relaunched) process 0, at
    random moments; each time the database holds a prefix of the records, byte for byte those of a
    one-process extraction, and a third launch completes it to exactly that database."""
    n_images = 400  # 100 rounds of two batches of 2, at least 4 ms each
    uninterrupted = tmp_path / "uninterrupted.lmdb"
    extract_codes(fake_encode, make_dataset(n_images), uninterrupted, make_plan(), batch_size=2, progress=False)
    reference = dict(stored_items(uninterrupted))
    out = tmp_path / "codes.lmdb"
    script = tmp_path / "extract.py"
    script.write_text(KILLED_LAUNCH.format(tests=str(ROOT / "tests"), out=str(out), n_images=n_images))
    rng = random.Random(0)
    progress = []
    for victim in (1, 0):
        launcher, pids = start_launch(script)
        try:
            time.sleep(rng.uniform(0.05, 0.25))
            os.kill(pids[victim], signal.SIGKILL)
            launcher.wait(timeout=120)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
        assert launcher.returncode != 0
        progress.append(committed_records(out, reference))
    assert 0 < progress[0] <= progress[1] < n_images, progress

    launcher, _ = start_launch(script)
    assert launcher.wait(timeout=300) == 0
    assert stored_items(out) == stored_items(uninterrupted)


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
    pytest.param({"format_version": 3}, "format_version 3, newer than this code reads", id="newer-version"),
    pytest.param({"levels": 3}, "lacks middle_shape, middle_codes", id="levels-without-their-grids"),
    pytest.param({"levels": 1}, "has levels 1: expected an integer >= 2", id="one-level"),
    pytest.param({"levels": 3, "middle_shape": [3, 3], "middle_codes": 5}, "has 3 levels but format_version 1",
                 id="levels-in-version-1"),
    pytest.param({"count": 41}, "holds 40 records but its metadata says 41", id="count"),
])
def test_reader_refuses_bad_metadata(complete_db, changes, message):
    rewrite_metadata(complete_db, **changes)
    with pytest.raises(CodeStoreError, match=message):
        CodeDataset(complete_db)


@pytest.mark.parametrize("keep", [
    pytest.param(lambda size: size - 1, id="one-byte-short"),
    pytest.param(lambda size: 2 * 4096, id="only-the-meta-pages"),
])
def test_a_truncated_file_is_refused_not_a_crash(complete_db, keep):
    """Reading a page past the end of data.mdb through LMDB's mmap would kill the process (SIGBUS)."""
    data = complete_db / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as file:
        file.truncate(keep(size))
    message = f"is truncated: data.mdb holds {keep(size)} bytes but its last commit uses {size}"
    with pytest.raises(CodeStoreError, match=message):
        CodeDataset(complete_db)
    with pytest.raises(CodeStoreError, match=message):  # nor is it resumed
        extract_codes(fake_encode, make_dataset(), complete_db, make_plan(), progress=False)


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
    pytest.param(record_with(-1, 0, 0), r"label -1 outside \[0, 3\)", id="negative-label"),
])
def test_reader_refuses_a_damaged_record_naming_its_key(complete_db, value, message):
    rewrite(complete_db, record_key(7), value)
    codes = CodeDataset(complete_db)
    codes[6]
    with pytest.raises(CodeStoreError, match=f"record 7 \\(key 0000000000000007\\) .*{message}"):
        codes[7]


def test_a_damaged_record_read_in_a_worker_ends_a_script_with_one_line(complete_db, capsys):
    """A DataLoader raises a worker's error again with the worker's traceback in its message."""
    rewrite(complete_db, record_key(7), record_with(0, 5, 0))

    def main():
        for _ in DataLoader(CodeDataset(complete_db), batch_size=8, num_workers=1):
            pass

    with pytest.raises(SystemExit) as stop:
        run(main)
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {complete_db} record 7 (key 0000000000000007) has top code 5 >= codebook size 5: damaged record\n"
    )


class DiskFillsAfter:
    """An lmdb Environment whose write transactions fail to commit with lmdb.DiskError, as LMDB does
    on a full disk (ENOSPC from the page writes of mdb_txn_commit), once `commits` have succeeded."""

    def __init__(self, env, commits: int, fired):
        self.env, self.commits, self.fired = env, commits, fired

    def __getattr__(self, name):
        return getattr(self.env, name)

    def begin(self, write=False, **kwargs):
        txn = self.env.begin(write=write, **kwargs)
        return FailingCommit(txn, self) if write else txn


class FailingCommit:
    def __init__(self, txn, disk: DiskFillsAfter):
        self.txn, self.disk = txn, disk

    def __getattr__(self, name):
        return getattr(self.txn, name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None and self.disk.commits == 0:
            self.disk.fired()
            self.txn.abort()  # what mdb_txn_commit does when a write fails
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")
        self.disk.commits -= exc_type is None
        return self.txn.__exit__(exc_type, exc, traceback)


@pytest.mark.parametrize("commits, kept", [
    pytest.param(1 + 3, 12, id="during-records"),  # __plan__, then 3 batches of 4
    pytest.param(1 + 10, 40, id="at-the-completion-marker"),
])
def test_full_disk_stops_with_one_line_and_a_rerun_completes(tmp_path, monkeypatch, faults, commits, kept):
    faults.inject(lmdb, "open", lambda real_open, fired: lambda path, **kwargs: DiskFillsAfter(
        real_open(path, **kwargs), commits, fired))
    out = tmp_path / "codes.lmdb"
    with pytest.raises(CodeStoreError) as stop:
        extract_codes(fake_encode, make_dataset(), out, make_plan(), batch_size=4, progress=False)
    monkeypatch.undo()
    assert str(stop.value) == (
        f"disk full while writing {out} (mdb_txn_commit: No space left on device): the {kept} records committed "
        "before are kept; free space and run the same command again to resume"
    )
    uninterrupted = tmp_path / "uninterrupted.lmdb"
    extract_codes(fake_encode, make_dataset(), uninterrupted, make_plan(), batch_size=4, progress=False)
    assert committed_records(out, dict(stored_items(uninterrupted))) == kept

    encoded = []
    def counting_encode(images):
        encoded.append(len(images))
        return fake_encode(images)

    assert extract_codes(counting_encode, make_dataset(), out, make_plan(), batch_size=4, progress=False) == N_IMAGES
    assert sum(encoded) == N_IMAGES - kept
    assert stored_items(out) == stored_items(uninterrupted)


def test_writer_refuses_a_key_twice(tmp_path):
    with CodeWriter(tmp_path / "codes.lmdb") as writer:
        writer.put_many([(record_key(0), b"x")])
        with pytest.raises(CodeStoreError, match="holds key 0000000000000000 already"):
            writer.put_many([(record_key(1), b"y"), (record_key(0), b"z")])
        assert writer.entries() == 1  # the failed batch left nothing behind


def run_script(*args):
    return subprocess.run([sys.executable, "scripts/extract_codes.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=SCRIPT_ENV)


def test_script_help():
    result = run_in_process("scripts/extract_codes.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "--vqvae" in result.stdout and "--out" in result.stdout


@pytest.fixture(scope="module")
def tiny_vqvae(tmp_path_factory):
    """-> (folder of 12 random 32x32 images in two classes, a tiny VQ-VAE's run directory, the VQ-VAE)."""
    from PIL import Image

    from pipelines.store.checkpoint import save_checkpoint
    from vqvae import VQVAE2, VQVAE2Config

    root = tmp_path_factory.mktemp("tiny_vqvae")
    for k in range(12):
        folder = root / "images" / ("cats" if k % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
        Image.fromarray(pixels.numpy()).save(folder / f"{k:02d}.png")
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(top_codes=8, bottom_codes=300, code_dim=4, channels=8, res_channels=4,
                                n_res_blocks=1)).eval()
    save_checkpoint(root / "vqvae" / "model.safetensors", model.state_dict(), "vqvae2", model.config, image_size=32)
    return root / "images", root / "vqvae", model


def extract_args(tiny_vqvae, out, batch_size=4) -> list[str]:
    images, vqvae, _ = tiny_vqvae
    return ["--vqvae", str(vqvae), "--data", str(images), "--out", str(out), "--batch-size", str(batch_size),
            "--precision", "fp32"]


def test_script_extracts_a_tiny_vqvae_and_resumes_nothing_when_done(tiny_vqvae, tmp_path):
    from pipelines.data.datasets import load_dataset, to_model_range

    image_folder, _, model = tiny_vqvae
    out = tmp_path / "codes.lmdb"
    args = extract_args(tiny_vqvae, out)

    result = run_in_process("scripts/extract_codes.py", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"{out}: 10 records, complete"
    # the reruns before this process reads the records: lmdb opens a database once per process
    again = run_in_process("scripts/extract_codes.py", *args)
    assert again.returncode == 0, again.stderr
    assert "is complete already" in again.stdout and "wrote" not in again.stdout
    assert again.stdout.strip().splitlines()[-1] == f"{out}: 10 records, complete"
    other_split = run_in_process("scripts/extract_codes.py", *args, "--split", "test")
    assert other_split.returncode == 2 and "made by a different job" in other_split.stderr

    codes = CodeDataset(out)
    assert codes.metadata["top_shape"] == [4, 4] and codes.metadata["bottom_shape"] == [8, 8]
    assert codes.metadata["n_classes"] == 2 and codes.metadata["bottom_codes"] == 300
    images = load_dataset(str(image_folder), "train", 32)
    with torch.no_grad():
        top, bottom = model.encode(to_model_range(torch.stack([images[i][0] for i in range(10)])))
    assert torch.equal(torch.stack([codes[i][0] for i in range(10)]), top)
    assert torch.equal(torch.stack([codes[i][1] for i in range(10)]), bottom)
    assert [codes[i][2].item() for i in range(10)] == images.labels


def test_two_processes_write_the_database_one_process_writes(tiny_vqvae, tmp_path):
    """10 images in batches of 4: in the second round process 0 has the last 2 images, process 1 none."""
    one, two = tmp_path / "one.lmdb", tmp_path / "two.lmdb"
    assert run_in_process("scripts/extract_codes.py", *extract_args(tiny_vqvae, one)).returncode == 0
    result = subprocess.run(launch_command(2, "scripts/extract_codes.py", *extract_args(tiny_vqvae, two)), cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=SCRIPT_ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es) on cpu, precision fp32" in result.stdout
    assert result.stdout.count(f"{two}: 10 records, complete") == 1
    assert stored_items(two) == stored_items(one)


def test_cuda_asked_for_where_there_is_none_is_refused_before_writing(tiny_vqvae, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_script(*extract_args(tiny_vqvae, tmp_path / "codes.lmdb"), "--device", "cuda")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: --device cuda: no CUDA device is available here")
    assert not (tmp_path / "codes.lmdb").exists()


def test_script_stops_with_one_line_when_the_file_cannot_grow_and_a_rerun_completes(tiny_vqvae, tmp_path):
    """A real write failure, not a simulated one: the child may not grow files past 28 KiB
    (RLIMIT_FSIZE; Python ignores SIGXFSZ), so a commit fails part way through the database, as on
    a disk that fills (LMDB reports EFBIG, or EIO where a page was written in part)."""
    limit = 7 * 4096  # data.mdb's two meta pages, then about a page per commit of one record

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    out = tmp_path / "codes.lmdb"
    args = extract_args(tiny_vqvae, out, batch_size=1)
    result = subprocess.run([sys.executable, "scripts/extract_codes.py", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=SCRIPT_ENV, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith(f"error: writing {out} failed (mdb_txn_commit: "), result.stderr
    assert "is the disk full?" in error and error.endswith("run the same command again to resume")
    kept = int(error.split("): the ")[1].split(" records committed")[0])
    assert 0 < kept < 10

    result = run_in_process("scripts/extract_codes.py", *args)
    assert result.returncode == 0, result.stderr
    assert f"resuming after {kept} of 10 records" in result.stdout
    uninterrupted = tmp_path / "uninterrupted.lmdb"
    assert run_in_process("scripts/extract_codes.py", *extract_args(tiny_vqvae, uninterrupted)).returncode == 0
    assert stored_items(out) == stored_items(uninterrupted)


def damage(path, problem: str) -> str:
    """Damages a complete database the way `problem` says; -> the message a reader must give."""
    if problem == "foreign":
        for key, _ in stored_items(path):
            rewrite(path, key, None)
        rewrite(path, b"image-0", b"\x00" * 10)
        return "is not a code database: it has no __meta__ record"
    if problem == "truncated":
        with open(path / "data.mdb", "r+b") as file:
            file.truncate(3 * 4096)
        return "is truncated: data.mdb holds 12288 bytes"
    if problem == "newer-version":
        rewrite_metadata(path, format_version=3)
        return "has format_version 3, newer than this code reads"
    if problem == "incomplete":
        rewrite(path, META_KEY, None)
        return "is incomplete: extraction did not finish"
    records = {"top-code": record_with(0, 5, 0), "bottom-code": record_with(0, 0, 300), "label": record_with(3, 0, 0)}
    for index in range(N_IMAGES):  # every record: the first batch read meets one
        rewrite(path, record_key(index), records[problem])
    return {"top-code": "top code 5 >= codebook size 5", "bottom-code": "bottom code 300 >= codebook size 300",
            "label": r"label 3 outside \[0, 3\)"}[problem]


@pytest.mark.parametrize("problem", ["foreign", "truncated", "newer-version", "incomplete"])
def test_train_prior_refuses_a_bad_database_before_training(complete_db, tmp_path, problem):
    from pipelines.train.priors import PriorTrainConfig, train

    message = damage(complete_db, problem)
    with pytest.raises(CodeStoreError, match=message):
        train(PriorTrainConfig(codes=str(complete_db), out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("problem", ["top-code", "label"])
def test_train_prior_script_stops_at_a_damaged_record_with_one_line(complete_db, tmp_path, problem):
    """Records are checked as they are read: training stops at the first damaged one, naming it."""
    message = damage(complete_db, problem)
    result = subprocess.run(
        [sys.executable, "scripts/train_prior.py", "--codes", str(complete_db), "--out", str(tmp_path / "run"),
         "--preset", "cpu-top", "--steps", "2", "--batch-size", "4", "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=SCRIPT_ENV,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: {complete_db} record \d+ \(key [0-9a-f]{{16}}\) has {message}: damaged record", error)


# -- levels: records hold every level; a two-level database is the one this format always wrote

# A two-level database of three records (2x2 top codes < 6, 4x4 bottom codes < 5, three classes)
# written by the code of commit d7312e8, before the number of levels became a parameter: every
# LMDB key and value as hex, and the labels and codes it was written from.
TWO_LEVEL_DATABASE = Path(__file__).parent / "fixtures" / "codes_two_levels.json"


def two_level_database(path) -> dict:
    """The fixture's database rebuilt at `path` byte for byte; -> the fixture."""
    fixture = json.loads(TWO_LEVEL_DATABASE.read_text())
    with lmdb.open(str(path), subdir=True, map_size=2**20) as env, env.begin(write=True) as txn:
        for key, value in fixture["records"].items():
            txn.put(bytes.fromhex(key), bytes.fromhex(value))
    return fixture


def test_a_two_level_database_written_before_levels_reads_unchanged_and_is_what_is_written_now(tmp_path):
    fixture = two_level_database(tmp_path / "old.lmdb")
    codes = CodeDataset(tmp_path / "old.lmdb")
    metadata = codes.metadata
    assert "levels" not in metadata and metadata["format_version"] == 1 and len(codes) == 3
    for index, (top, bottom, label) in enumerate(codes):
        assert top.tolist() == fixture["top"][index] and bottom.tolist() == fixture["bottom"][index]
        assert label.item() == fixture["labels"][index]
    plan = {name: metadata[name] for name in metadata if name not in ("format", "format_version", "count")}
    batch = (torch.tensor(fixture["labels"]), torch.tensor(fixture["top"]), torch.tensor(fixture["bottom"]))
    for given in (plan, {**plan, "levels": 2}):  # saying two levels writes the same database
        new = tmp_path / f"new-{len(given)}.lmdb"
        write_codes(new, given, [batch])
        assert {key.hex(): value.hex() for key, value in stored_items(new)} == fixture["records"]


def test_an_extraction_begun_before_levels_resumes(tmp_path):
    """An incomplete two-level database (no `levels` in its plan) continues with today's plan."""
    dataset = make_dataset(8)
    extract_codes(fake_encode, dataset, tmp_path / "whole.lmdb", make_plan(), batch_size=4, progress=False)
    begun = tmp_path / "begun.lmdb"
    with lmdb.open(str(begun), subdir=True, map_size=2**20) as env, env.begin(write=True) as txn:
        for key, value in stored_items(tmp_path / "whole.lmdb"):
            if key != META_KEY and key not in (record_key(i) for i in range(4, 8)):
                txn.put(key, value)
    assert extract_codes(fake_encode, dataset, begun, make_plan(levels=2), batch_size=4, progress=False) == 8
    assert stored_items(begun) == stored_items(tmp_path / "whole.lmdb")


def three_level_plan(**changes) -> dict:
    return make_plan(levels=3, top_shape=(1, 1), middle_shape=(2, 2), bottom_shape=(4, 4), middle_codes=7, **changes)


def three_level_batch(n: int):
    """(labels, top (n, 1, 1), middle (n, 2, 2), bottom (n, 4, 4)) codes."""
    generator = torch.Generator().manual_seed(n)
    grids = [torch.randint(0, size, (n, side, side), generator=generator) for size, side in ((5, 1), (7, 2), (300, 4))]
    return torch.arange(n) % 3, *grids


def test_three_levels_round_trip_with_their_count_in_the_metadata(tmp_path):
    labels, top, middle, bottom = three_level_batch(6)
    assert write_codes(tmp_path / "codes.lmdb", three_level_plan(), [(labels, top, middle, bottom)]) == 6
    with lmdb.open(str(tmp_path / "codes.lmdb"), subdir=True, readonly=True, lock=False) as env, env.begin() as txn:
        flat = [c for grid in (top, middle, bottom) for c in grid[1].flatten().tolist()]
        assert txn.get(record_key(1)) == record_bytes(labels[1].item(), flat, [])
    codes = CodeDataset(tmp_path / "codes.lmdb")
    assert codes.metadata["levels"] == 3 and codes.metadata["format_version"] == 2
    assert record_size(codes.metadata) == 4 + 2 * (1 + 4 + 16)
    for index in range(6):
        record = codes[index]
        assert len(record) == 4 and all(t.dtype == torch.int64 for t in record)
        for got, want in zip(record, (top[index], middle[index], bottom[index], labels[index])):
            assert torch.equal(got, want)


@pytest.mark.parametrize("plan, batch, message", [
    pytest.param(dict(levels=3), None, "lacks middle_shape, middle_codes", id="missing-level"),
    pytest.param(dict(level3_shape=(8, 8)), None, "unknown fields level3_shape", id="unknown-level"),
    pytest.param({}, lambda b: b[:3], r"encode gave 2 code grids, expected 3 \(top, middle, bottom\)", id="grids"),
    pytest.param({}, lambda b: (b[0], b[1], b[2] + 7, b[3]), r"middle codes 7..13, outside \[0, 7\)", id="range"),
])
def test_bad_three_level_plans_and_batches_are_refused(tmp_path, plan, batch, message):
    given = make_plan(**plan) if plan else three_level_plan()
    batches = [(batch or (lambda b: b))(three_level_batch(2))]
    with pytest.raises((CodeStoreError, ValueError), match=message):
        write_codes(tmp_path / "codes.lmdb", given, batches)


def test_a_three_level_vqvae_extracts_every_level(tmp_path, tiny_vqvae):
    from pipelines.data.codes import code_splits
    from pipelines.data.datasets import load_dataset, to_model_range
    from pipelines.infer.extract import extract_with_vqvae
    from pipelines.store.checkpoint import save_checkpoint
    from vqvae import VQVAE2, VQVAE2Config

    image_folder, _, _ = tiny_vqvae
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(levels=3, top_codes=8, middle_codes=16, bottom_codes=300, code_dim=4, channels=8,
                                res_channels=4, n_res_blocks=1)).eval()
    save_checkpoint(tmp_path / "vqvae" / "model.safetensors", model.state_dict(), "vqvae2", model.config, image_size=32)
    out = tmp_path / "codes.lmdb"
    assert extract_with_vqvae(tmp_path / "vqvae", str(image_folder), out) == 10
    codes = CodeDataset(out)
    assert [codes.metadata[f"{name}_shape"] for name in ("top", "middle", "bottom")] == [[2, 2], [4, 4], [8, 8]]
    assert [codes.metadata[f"{name}_codes"] for name in ("top", "middle", "bottom")] == [8, 16, 300]
    images = load_dataset(str(image_folder), "train", 32)
    with torch.no_grad():
        expected = model.encode(to_model_range(torch.stack([images[i][0] for i in range(10)])))
    for k, level_codes in enumerate(expected):
        assert torch.equal(torch.stack([codes[i][k] for i in range(10)]), level_codes)
    middle = code_splits(out, "1")  # by index: the middle prior's grid, conditioned on the top grid
    assert (middle.provenance.level, middle.provenance.index, middle.provenance.levels) == ("middle", 1, 3)
    x, _, cond = middle.inputs(next(iter(torch.utils.data.DataLoader(middle.every_record, batch_size=10))))
    assert torch.equal(x, expected[1].to(x.dtype)) and torch.equal(cond, expected[0].to(cond.dtype))


def test_the_reports_codebook_histograms_count_every_level(tmp_path):
    from pipelines.eval.report import code_counts

    labels, top, middle, bottom = three_level_batch(6)
    write_codes(tmp_path / "codes.lmdb", three_level_plan(), [(labels, top, middle, bottom)])
    counts = code_counts(CodeDataset(tmp_path / "codes.lmdb"))
    assert list(counts) == ["top", "middle", "bottom"]
    for count, grid, size in zip(counts.values(), (top, middle, bottom), (5, 7, 300)):
        assert count.tolist() == torch.bincount(grid.flatten(), minlength=size).tolist()
