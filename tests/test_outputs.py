"""The one output writer (pipelines.store.outputs): checks before the work, atomic writes, one-line
errors naming the user's path, temporaries removed on any exit and after a kill."""

import errno
import os

import pytest
from launch import run_in_process
from safetensors import SafetensorError

from pipelines.store import outputs
from pipelines.store.outputs import OutputError, check_output, output_dir, output_file, remove_temporaries
from test_completion import pixel_model  # noqa: F401 (a fixture: a tiny pixel model and images/)

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_file_is_replaced_whole_and_its_folder_created(tmp_path):
    target = tmp_path / "new" / "deeper" / "a.txt"
    with output_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".a.txt.") and tmp.name.endswith(".tmp")
        tmp.write_text("one")
        assert not target.exists()  # nothing under the real name until the block succeeds
    with output_file(target) as tmp:
        tmp.write_text("two")
    assert target.read_text() == "two" and listing(target.parent) == ["a.txt"]


@pytest.mark.parametrize("stop", [RuntimeError("boom"), KeyboardInterrupt()])
def test_any_exit_removes_the_temporary_and_keeps_the_old_file(stop, tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(type(stop)):
        with output_file(target) as tmp:
            tmp.write_text("half")
            raise stop
    assert listing(tmp_path) == ["a.txt"] and target.read_text() == "old"


@pytest.mark.parametrize("resumes", [False, True])
def test_a_full_disk_is_one_line_naming_the_users_path(resumes, tmp_path):
    target = tmp_path / "scores.csv"
    with pytest.raises(OutputError) as caught:
        with output_file(target, resumes=resumes) as tmp:
            tmp.write_text("half")
            raise ENOSPC
    message = str(caught.value)
    assert message.startswith(f"cannot write {target}: No space left on device; free space and run the same command")
    assert ".tmp" not in message and "\n" not in message
    assert ("resumes where this one stopped" in message) == resumes
    assert caught.value.errno == errno.ENOSPC and caught.value.strerror == os.strerror(errno.ENOSPC)
    assert listing(tmp_path) == []


def test_a_full_disk_reported_by_safetensors_and_a_refused_rename_are_named_too(tmp_path, faults):
    target = tmp_path / "codes.safetensors"
    with pytest.raises(OutputError, match=f"^cannot write {target}: No space left on device; free space"):
        with output_file(target):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"
                                  " os error 28")

    def refuse(original, fired):
        def replace(source, destination):
            fired()
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(source), str(destination))
        return replace

    faults.inject(outputs.os, "replace", refuse)
    with pytest.raises(OutputError) as caught:
        with output_file(target, resumes=True) as tmp:
            tmp.write_text("whole")
    assert str(caught.value) == (f"cannot write {target}: Permission denied; run the same command again: it resumes "
                                 "where this one stopped, keeping what was written")
    assert listing(tmp_path) == []


def test_an_error_about_another_file_passes_unchanged(tmp_path):
    missing = tmp_path / "input.png"
    with pytest.raises(FileNotFoundError) as caught:
        with output_file(tmp_path / "out.npz"):
            missing.read_bytes()
    assert type(caught.value) is FileNotFoundError and caught.value.filename == str(missing)
    assert listing(tmp_path) == []


def test_a_folder_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=f"^cannot write {tmp_path / 'file' / 'a.png'}: a folder on its way is a file$"):
        with output_file(tmp_path / "file" / "a.png"):
            pass


@pytest.mark.parametrize("name, option, suffixes", [("r.pdf", "--out", (".html", ".htm")),
                                                    ("c.jpg", "--curves", (".png",)),
                                                    ("x.xlsx", "--out", (".csv",))])
def test_check_output_refuses_a_suffix_other_than_what_is_written(name, option, suffixes, tmp_path):
    with pytest.raises(ValueError, match=f"^{option} {tmp_path / name}: the file is written as {suffixes[0]}, so its "
                                         f"name must end in {' or '.join(suffixes)}$"):
        check_output(tmp_path / name, option, suffixes)
    assert check_output(tmp_path / ("R" + suffixes[-1].upper()), option, suffixes) == tmp_path / ("R" + suffixes[-1].upper())
    assert listing(tmp_path) == []


def test_check_output_refuses_targets_that_could_not_be_written(tmp_path, faults):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    cases = [(tmp_path / "dir", {}, f"--out {tmp_path / 'dir'} is a directory: give a file name"),
             (tmp_path / "file", {"directory": True}, f"--out {tmp_path / 'file'} is a file: give a directory"),
             (tmp_path / "file" / "sub" / "a.png", {}, f"{tmp_path / 'file'} is a file, not a folder"),
             (tmp_path / "new" / ("x" * 300 + ".png"), {}, "is longer than its file system allows"),
             (tmp_path / "file", {"replace": False}, f"--out {tmp_path / 'file'} exists: choose another name")]
    for path, options, message in cases:
        with pytest.raises(OSError if "exists" in message else ValueError, match=message.replace("(", r"\(")):
            check_output(path, "--out", **options)

    def refuse(original, fired):
        def open_(path, *args, **kwargs):
            if str(path).startswith(str(tmp_path / "dir")):
                fired()
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return original(path, *args, **kwargs)
        return open_

    faults.inject(outputs.os, "open", refuse)  # root writes anywhere: a refusal is simulated
    for path, directory in ((tmp_path / "dir" / "new" / "a.csv", False), (tmp_path / "dir", True)):
        with pytest.raises(ValueError, match=f"^--out {path}: cannot write in {tmp_path / 'dir'} \\(Permission denied\\)$"):
            check_output(path, "--out", directory=directory)
    assert listing(tmp_path) == ["dir", "file"] and listing(tmp_path / "dir") == []


def test_a_rerun_removes_the_temporaries_a_kill_left_and_only_those(tmp_path):
    left = [".scores.csv.0123456789abcdef.tmp", ".scores.csv.fedcba9876543210.tmp"]
    others = [".other.csv.0123456789abcdef.tmp", ".scores.csv.tmp", "scores.csv.0123456789abcdef.tmp", "keep.csv"]
    for name in left + others:
        (tmp_path / name).write_text("")
    check_output(tmp_path / "scores.csv", "--out", (".csv",))
    assert listing(tmp_path) == sorted(others)
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / ".000001.png.0123456789abcdef.tmp").write_text("")
    check_output(tmp_path / "maps", "--maps", directory=True)
    assert listing(tmp_path / "maps") == []
    remove_temporaries(tmp_path)
    assert listing(tmp_path) == sorted([".scores.csv.tmp", "keep.csv", "maps", "scores.csv.0123456789abcdef.tmp"])


def test_a_failed_directory_job_leaves_nothing_unless_work_was_kept(tmp_path):
    out = tmp_path / "new" / "samples"
    with pytest.raises(RuntimeError):
        with output_dir(out, scaffolding=("job.json",)) as directory:
            (directory / "job.json").write_text("{}")
            (directory / ".000000.png.0123456789abcdef.tmp").write_text("")
            raise RuntimeError("the first batch failed")
    assert listing(tmp_path) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with output_dir(tmp_path / "empty", scaffolding=("job.json",)) as directory:
            (directory / "job.json").write_text("{}")
            raise KeyboardInterrupt
    assert listing(tmp_path) == ["empty"] and listing(tmp_path / "empty") == []
    with pytest.raises(RuntimeError):
        with output_dir(out, scaffolding=("job.json",)) as directory:
            (directory / "job.json").write_text("{}")
            (directory / "000000.png").write_text("")
            raise RuntimeError("the second batch failed")
    assert listing(out) == ["000000.png", "job.json"]


def test_a_temporary_a_live_writer_holds_is_no_leftover(tmp_path):
    target = tmp_path / "scores.csv"
    with output_file(target) as tmp:
        tmp.write_text("half")
        check_output(target, "--out", (".csv",))  # a second command on the same output, meanwhile
        assert tmp.exists()
    assert listing(tmp_path) == ["scores.csv"]


# -- the scripts -----------------------------------------------------------------------------------


def one_error_line(result):
    """The one error line a script exited 2 with (after its progress bar, if any) -> its message."""
    last = result.stderr.rstrip("\n").split("\n")[-1]
    assert result.returncode == 2 and last.startswith("error: ") and "Traceback" not in result.stderr, \
        (result.returncode, result.stderr[-2000:])
    return last.removeprefix("error: ")


@pytest.fixture
def a_file(tmp_path):
    file = tmp_path / "file"
    file.write_text("not a folder")
    return file


MODEL = ["--vqvae", "no-vqvae", "--top", "no-top", "--bottom", "no-bottom"]  # never read: refused before


@pytest.mark.parametrize("script, args, message", [
    ("score.py", ["--ckpt", "no-model", "--data", "builtin", "--out", "{tmp}/x.xlsx"],
     "--out {tmp}/x.xlsx: the file is written as .csv, so its name must end in .csv"),
    ("score.py", ["--ckpt", "no-model", "--data", "builtin", "--maps", "{file}"],
     "--maps {file} is a file: give a directory"),
    ("sample.py", [*MODEL, "--out", "{tmp}/grid.png", "--save-codes", "{file}/codes.safetensors"],
     "--save-codes {file}/codes.safetensors: {file} is a file, not a folder"),
    ("sample.py", [*MODEL, "--out", "{tmp}/grid.jpg"],
     "--out {tmp}/grid.jpg: the file is written as .png, so its name must end in .png"),
    ("sample.py", [*MODEL, "--out-dir", "{file}"], "--out-dir {file} is a file: give a directory"),
    ("complete.py", ["--ckpt", "no-model", "{tmp}", "--out-dir", "{file}/sub"],
     "--out-dir {file}/sub: {file} is a file, not a folder"),
    ("extract_codes.py", ["--vqvae", "no-vqvae", "--data", "builtin", "--out", "{file}"],
     "--out {file} is a file: give a directory"),
    ("evaluate.py", ["pixels", "--ckpt", "no-model", "--data", "builtin", "--json", "{tmp}/eval.txt"],
     "--json {tmp}/eval.txt: the file is written as .json, so its name must end in .json"),
    ("train_prior.py", ["--codes", "no-codes", "--level", "top", "--out", "{file}"],
     "--out {file} is a file: give a directory"),
])
def test_scripts_refuse_an_output_they_could_not_write_before_any_work(script, args, message, a_file, tmp_path):
    """Each refusal comes before any model or data is read (none of them exists) and writes nothing."""
    fill = {"tmp": tmp_path, "file": a_file}
    result = run_in_process(f"scripts/{script}", *(arg.format(**fill) for arg in args))
    assert one_error_line(result) == message.format(**fill)
    assert listing(tmp_path) == ["file"]


@pytest.mark.parametrize("stop, status, last_line", [
    (ValueError("the first batch failed"), 2, "error: the first batch failed"),
    (KeyboardInterrupt(), 130, "interrupted: the samples written to --out-dir are kept; run the same command again "
                               "to resume after them"),
])
def test_a_sampling_job_that_fails_before_its_first_sample_leaves_nothing(stop, status, last_line, tiny_pipeline,
                                                                          tmp_path, faults):
    import pipelines.infer.sample_jobs

    def failing(original, fired):
        def make_samples(*args, **kwargs):
            fired()
            raise stop
        return make_samples

    command = ["scripts/sample.py", *(f"--{name}={tiny_pipeline / name}" for name in ("vqvae", "top", "bottom")),
               "--label", "0", "--n", "2", "--device", "cpu"]
    (tmp_path / "empty").mkdir()
    for out_dir in (tmp_path / "new" / "samples", tmp_path / "empty"):
        faults.inject(pipelines.infer.sample_jobs, "make_samples", failing)
        result = run_in_process(*command, "--out-dir", out_dir)
        faults.monkeypatch.undo()
        assert result.returncode == status and result.stderr.strip().splitlines()[-1] == last_line, result.stderr
        assert listing(tmp_path) == ["empty"] and listing(tmp_path / "empty") == []
    result = run_in_process(*command, "--out-dir", tmp_path / "empty")  # the corrected command is not refused
    assert result.returncode == 0, result.stderr[-2000:]
    assert "samples.npz" in listing(tmp_path / "empty")


def test_score_removes_the_temporaries_a_kill_left_and_names_its_csv_on_a_full_disk(pixel_model, tmp_path, faults):
    import pipelines.infer.scoring

    out, maps = tmp_path / "out" / "scores.csv", tmp_path / "out" / "maps"
    maps.mkdir(parents=True)
    for leftover in (out.parent / ".scores.csv.0123456789abcdef.tmp", maps / ".000000_a.png.fedcba9876543210.tmp"):
        leftover.write_text("a SIGKILL left this")
    command = ["scripts/score.py", "--ckpt", pixel_model / "pixels.safetensors", pixel_model / "images",
               "--out", out, "--maps", maps, "--device", "cpu"]
    result = run_in_process(*command)
    assert result.returncode == 0, result.stderr[-2000:]
    assert listing(out.parent) == ["maps", "scores.csv"] and listing(maps) == ["000000_a.png", "000001_b.png"]
    written = out.read_text()

    def full_disk(original, fired):
        def writer(file, *args, **kwargs):
            rows = original(file, *args, **kwargs)

            class Rows:
                def writerow(self, row):
                    if row[0] != "image":  # the header goes in; the first image's row fills the disk
                        fired()
                        raise ENOSPC
                    return rows.writerow(row)
            return Rows()
        return writer

    faults.inject(pipelines.infer.scoring.csv, "writer", full_disk)
    result = run_in_process(*command)
    assert one_error_line(result) == (f"cannot write {out}: No space left on device; free space and run the same "
                                      "command again")
    assert out.read_text() == written and listing(out.parent) == ["maps", "scores.csv"]


@pytest.mark.parametrize("damage", [(b'"F32"', b'"932"'),  # safetensors lists every dtype it knows
                                    (b'"shape"', b'"shap\\"')])  # the JSON itself broken
def test_a_damaged_safetensors_header_is_one_short_line(damage, pixel_model, tmp_path):
    from pipelines.store.checkpoint import CheckpointError, load_pixelsnail

    data = (pixel_model / "pixels.safetensors").read_bytes()
    assert data.count(damage[0]) >= 1 and len(damage[0]) == len(damage[1])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data.replace(damage[0], damage[1], 1))
    with pytest.raises(CheckpointError) as caught:
        load_pixelsnail(bad)
    message = str(caught.value)
    assert message.startswith(f"{bad} is not a readable safetensors checkpoint (its header is damaged: ")
    assert len(message) < len(str(bad)) + 150 and "\n" not in message and "BF16" not in message
