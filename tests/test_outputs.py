"""The one output writer (pipelines.store.outputs): checks before the work, atomic writes, one-line
errors naming the user's path, temporaries removed on any exit and after a kill."""

import errno
import os

import pytest
from safetensors import SafetensorError

from pipelines.store import outputs
from pipelines.store.outputs import OutputError, check_output, output_dir, output_file, remove_temporaries

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
