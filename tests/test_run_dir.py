"""A run directory under real conditions: data identity on resume, models never overwritten, one
trainer at a time, `~` in paths, a batch larger than the data, a real full disk, finished runs
resumed, and the permissions of written files."""

import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from launch import launch_command
from pipelines.data.datasets import ImageTensorDataset
from pipelines.infer.extract import extract_codes
from pipelines.store import run_files
from test_training import (ENV, ROOT, TRAINERS, command, config, data, run_cli,  # noqa: F401 (data: a fixture)
                           run_script, saved_step, start, wait_until)

pytestmark = pytest.mark.usefixtures("one_thread")


def other_codes(path, vqvae_sha256, n_records):
    """A code database like the `data` fixture's, of another VQ-VAE hash and record count."""
    images = torch.zeros(n_records, 3, 8, 8, dtype=torch.uint8)
    plan = dict(top_shape=(2, 2), bottom_shape=(4, 4), top_codes=5, bottom_codes=300, n_classes=3,
                vqvae_sha256=vqvae_sha256, image_size=8, source={"data": "generated", "split": "train"})
    extract_codes(lambda b: (b[:, 0, ::4, ::4].long(), b[:, 0, ::2, ::2].long()),
                  ImageTensorDataset(images, torch.arange(n_records) % 3), path, plan, batch_size=8, progress=False)
    return path


def resume_args(trainer, run_dir, *more):
    return [TRAINERS[trainer][0], "--out", str(run_dir), "--resume", "--precision", "fp32", *more]


# Item 1: a resumed run checks the identity of its data, wherever the path points.

def test_a_relative_codes_path_resumed_elsewhere_is_checked(data, tmp_path, monkeypatch):
    """Trained from folder X with `--codes codes.lmdb`, resumed from folder Y with the same words: Y's
    database, made by another VQ-VAE, is refused in one line naming both paths; nothing is trained."""
    x, y = tmp_path / "x", tmp_path / "y"
    x.mkdir(), y.mkdir()
    shutil.copytree(data / "codes.lmdb", x / "codes.lmdb")
    other_codes(y / "codes.lmdb", "cd" * 32, 60)
    run_dir = tmp_path / "run"
    monkeypatch.chdir(x)
    train_args = [*command("prior", data, run_dir, steps=2), "--codes", "codes.lmdb"]
    status, stderr = run_script(train_args)
    assert status == 0, stderr[-2000:]
    assert run_files.read_progress(run_dir)["train_config"]["codes"] == str(x / "codes.lmdb")
    monkeypatch.chdir(y)
    status, stderr = run_script(resume_args("prior", run_dir, "--codes", "codes.lmdb", "--steps", "3"))
    assert status == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.startswith("error: ") and str(y / "codes.lmdb") in stderr and str(x / "codes.lmdb") in stderr
    assert "vqvae_sha256" in stderr and saved_step(run_dir) == 2


def test_an_image_run_resumes_on_its_own_absolute_data(data, tmp_path, monkeypatch):
    """`--data images` (relative) is stored absolute: resumed from elsewhere without --data it trains
    on the same images; `--data images` there, another image set, is refused naming both."""
    x, y = tmp_path / "x", tmp_path / "y"
    shutil.copytree(data / "images", x / "images")
    shutil.copytree(data / "images", y / "images")
    for extra in sorted((y / "images").glob("*.png"))[:5]:
        extra.unlink()
    run_dir = tmp_path / "run"
    monkeypatch.chdir(x)
    status, stderr = run_script([*command("pixel", data, run_dir, steps=2), "--data", "images"])
    assert status == 0, stderr[-2000:]
    monkeypatch.chdir(y)
    status, stderr = run_script(resume_args("pixel", run_dir, "--data", "images", "--steps", "3"))
    assert status == 2 and stderr.count("\n") == 1, stderr[-2000:]
    assert str(y / "images") in stderr and str(x / "images") in stderr and saved_step(run_dir) == 2
    status, stderr = run_script(resume_args("pixel", run_dir, "--steps", "3"))
    assert status == 0 and saved_step(run_dir) == 3, stderr[-2000:]
    assert run_files.read_progress(run_dir)["train_config"]["data"] == str(x / "images")


# Item 8: a moved database resumes with its new path.

def test_a_moved_database_resumes_with_its_new_path(data, tmp_path):
    codes = shutil.copytree(data / "codes.lmdb", tmp_path / "codesA.lmdb")
    run_dir = tmp_path / "run"
    status, stderr = run_script([*command("prior", data, run_dir, steps=2), "--codes", str(codes)])
    assert status == 0, stderr[-2000:]
    moved = codes.rename(tmp_path / "codesB.lmdb")
    # in a new process: this one keeps codesA.lmdb open (LMDB opens a database once per process)
    resumed = start(resume_args("prior", run_dir, "--codes", str(moved), "--steps", "3"))
    stderr = resumed.communicate()[1]
    assert resumed.returncode == 0 and saved_step(run_dir) == 3, stderr[-2000:]
    assert run_files.read_progress(run_dir)["train_config"]["codes"] == str(moved)


# Item 2: a model without state is never overwritten silently.

@pytest.mark.parametrize("resume", [False, True])
def test_a_model_without_state_is_not_overwritten(resume, data, tmp_path):
    run_dir = tmp_path / "run"
    TRAINERS["pixel"][1](config("pixel", data, run_dir, steps=2))
    shutil.rmtree(run_dir / "state")
    model = (run_dir / "model.safetensors").read_bytes()
    args = command("pixel", data, run_dir, steps=2) + (["--resume"] if resume else [])
    status, stderr = run_script(args)
    assert status == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert str(run_dir / "model.safetensors") in stderr and "--out" in stderr and "--overwrite" in stderr
    assert (run_dir / "model.safetensors").read_bytes() == model
    if not resume:
        status, stderr = run_script(args + ["--overwrite"])
        assert status == 0 and saved_step(run_dir) == 2, stderr[-2000:]


# Item 14: --resume needs a run to resume.

@pytest.mark.parametrize("trainer", TRAINERS)
def test_resume_without_a_run_is_refused(trainer, data, tmp_path):
    run_dir = tmp_path / "typo"
    status, stderr = run_script(command(trainer, data, run_dir, steps=2) + ["--resume"])
    assert status == 2 and stderr.count("\n") == 1, stderr[-2000:]
    assert stderr.startswith(f"error: --resume: {run_dir} holds no run to resume")
    assert not run_dir.exists()


# Item 6: one trainer at a time in a run directory.

def test_a_second_trainer_is_refused_while_the_first_runs_and_a_killed_one_does_not_block(data, tmp_path):
    """Refused in this process, and under `accelerate launch` with two processes (both refuse, none
    hangs); once the first is killed (SIGKILL), its lock is gone and the run resumes."""
    run_dir = tmp_path / "run"
    first = start(command("pixel", data, run_dir, steps=100_000, checkpoint_every=5))
    try:
        assert wait_until(lambda: saved_step(run_dir) is not None, first), first.communicate()[1][-2000:]
        status, stderr = run_script(resume_args("pixel", run_dir, "--steps", "3"))
        assert status == 2 and stderr.count("\n") == 1, stderr[-2000:]
        assert stderr.startswith(f"error: {run_dir} is in use by another trainer (process {first.pid})")
        launched = subprocess.run(launch_command(2, *resume_args("pixel", run_dir, "--steps", "3")), cwd=ROOT,
                                  env=ENV, capture_output=True, text=True, timeout=300)
        assert launched.returncode != 0 and launched.stderr.count(f"error: {run_dir} is in use by another trainer") == 2
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    step = saved_step(run_dir)
    status, stderr = run_script(resume_args("pixel", run_dir, "--steps", str(step + 1)))
    assert status == 0 and saved_step(run_dir) == step + 1, stderr[-2000:]


# Item 9: `~` in every path option.

@pytest.mark.parametrize("trainer", TRAINERS)
def test_tilde_is_expanded_in_every_path_option(trainer, data, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(data, home / "data")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    args = command(trainer, Path("~/data"), "~/run", steps=1)
    status, stderr = run_script(args)
    assert status == 0, stderr[-2000:]
    assert saved_step(home / "run") == 1 and not (tmp_path / "~").exists()


# Item 11: a batch larger than the data, refused before the run directory exists.

@pytest.mark.parametrize("trainer", ["pixel", "prior"])
def test_a_batch_larger_than_the_data_is_refused_before_the_run_directory(trainer, data, tmp_path):
    run_dir = tmp_path / "run"
    status, stderr = run_script(command(trainer, data, run_dir, batch_size=500))
    assert status == 2 and stderr.count("\n") == 1, stderr[-2000:]
    assert "--batch-size 500" in stderr and ("38 " if trainer == "prior" else "36 ") in stderr, stderr
    assert not run_dir.exists()


# Item 4: a real full disk.

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: a failed writer may hold a file


def fill(disk, leave):
    """Fills the file system of `disk` up to `leave` free bytes."""
    stats = os.statvfs(disk)
    with open(disk / f"filler-{uuid.uuid4().hex}", "wb") as f:
        f.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))


@pytest.mark.parametrize("free", ["nothing", "the weights"])
def test_a_real_full_disk_gives_one_line_and_exit_2(free, data, small_disk, tmp_path, capsys):
    """The state's first file (safetensors) or its optimizer file (torch.save) meets a full tmpfs:
    one line, exit 2, nothing half-written left."""
    probe = tmp_path / "probe"
    TRAINERS["pixel"][1](config("pixel", data, probe, steps=1))
    weights = (probe / "state" / "model.safetensors").stat().st_size
    fill(small_disk, 0 if free == "nothing" else weights + 3 * 4096)
    run_dir = small_disk / "run"
    status, last_line = run_cli(TRAINERS["pixel"][1], config("pixel", data, run_dir, steps=2), capsys)
    assert status == 2
    assert last_line.startswith(f"error: saving step 1 in {run_dir} failed (") and last_line.endswith(
        "; no state was saved"), last_line
    assert ("(No space left on device)" if free == "nothing" else "(torch could not write a file") in last_line
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


# Item 15 (trainer parts).

def test_resuming_a_finished_run_adds_no_log_line(data, tmp_path):
    run_dir = tmp_path / "run"
    TRAINERS["pixel"][1](config("pixel", data, run_dir, steps=2))
    log = (run_dir / "log.jsonl").read_text()
    assert "null" not in log
    TRAINERS["pixel"][1](config("pixel", data, run_dir, steps=2, resume=True))
    assert (run_dir / "log.jsonl").read_text() == log


def test_written_files_follow_the_umask(data, tmp_path):
    previous = os.umask(0o022)
    try:
        run_dir = tmp_path / "run"
        TRAINERS["pixel"][1](config("pixel", data, run_dir, steps=1, n_samples=1))
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(run_dir)): p.stat().st_mode & 0o777 for p in run_dir.rglob("*") if p.is_file()}
    assert {"model.safetensors", "samples.png", "log.jsonl", "state/ema.safetensors", "state/progress.json",
            "state/model.safetensors"} <= modes.keys()
    assert set(modes.values()) == {0o644}, modes
