"""The one way the project writes an output: every file and directory a script writes is checked
before the work starts and written so that a reader never sees half of it.

- `check_output(path, option, suffixes)`: before any work, refuses in one line (naming the option
  and the user's path) an output that could not be written at the end: a directory where a file
  is wanted (or a file where a directory is), a name whose suffix is not what is written, a folder
  under a file, a place this process cannot write in, a name too long for its file system, or
  (where `replace` is off) a file that exists. It creates nothing; it removes the temporaries that
  a killed earlier run left for this output.
- `output_file(path)`: the file is written under a temporary name beside it and renamed onto it
  when the block succeeds; the temporary is removed however the block ends (an error, Ctrl-C).
  A write that fails (a full disk, no permission) is one line naming the user's path, never the
  temporary's, and saying whether the same command resumes.
- `output_dir(path, scaffolding)`: a directory of outputs (sample.py --out-dir) that a failed
  command leaves as it found it when nothing of its work was kept there.

A temporary is `.NAME.<16 hex digits>.tmp` beside NAME (`TEMPORARY`). Only a SIGKILL (or a power
cut) leaves one behind; `check_output` and `remove_temporaries` remove them on the next run. A
writer holds a lock on its temporary while it writes (the kernel drops it when the process dies,
however it dies), so a temporary another process is still writing is never taken for a leftover.
"""

import errno
import fcntl
import os
import re
import secrets
from contextlib import contextmanager, suppress
from pathlib import Path

from safetensors import SafetensorError

TEMPORARY = ".*.tmp"  # the glob of every temporary; TEMPORARY_NAME says which are ours
TEMPORARY_NAME = re.compile(r"\.(?P<stem>.+)\.[0-9a-f]{16}\.tmp")
STEM_CHARACTERS = 100  # of the target's name kept in its temporary's, so that a long name still fits
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class OutputError(OSError):
    """A failed write, as one line naming the user's path; errno and strerror are the system's."""

    def __init__(self, message, code, reason):
        super().__init__(code, reason)
        self.message = message

    def __str__(self):
        return self.message


def temporary_of(path: Path) -> Path:
    """A new temporary name beside `path`: `.NAME.<16 hex digits>.tmp`."""
    return path.parent / f".{path.name[:STEM_CHARACTERS]}.{secrets.token_hex(8)}.tmp"


def remove_temporaries(folder, name=None) -> None:
    """Removes the temporaries in `folder` that a killed run left: those of the file `name`, or all."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.glob(TEMPORARY):
        match = TEMPORARY_NAME.fullmatch(leftover.name)
        if match and leftover.is_file() and (name is None or match["stem"] == name[:STEM_CHARACTERS]):
            try:
                handle = os.open(leftover, os.O_RDONLY)
            except FileNotFoundError:  # its writer finished meanwhile
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                leftover.unlink(missing_ok=True)
            except BlockingIOError:  # a live writer holds it
                pass
            finally:
                os.close(handle)


def check_output(path, option, suffixes=(), *, directory=False, replace=True, replace_flag=None) -> Path:
    """Refuses, before any work, an output `path` (given as `option`) that could not be written:
    -> the path. `suffixes`: the endings its name may have (the first is what is written, e.g.
    (".html", ".htm")); `directory`: the output is a directory (its own files are checked by its
    writer); `replace`: an existing file may be replaced (else it is refused, naming `replace_flag`,
    the option that allows it, where there is one)."""
    path, where = Path(path), f"{option} {path}"
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{where} is a file: give a directory")
    if not directory:
        if path.is_dir():
            raise ValueError(f"{where} is a directory: give a file name")
        if suffixes and not path.name.lower().endswith(tuple(suffixes)):
            raise ValueError(f"{where}: the file is written as {suffixes[0]}, so its name must end in "
                             + " or ".join(suffixes))
        if not replace and path.exists():
            fix = f"pass {replace_flag} to replace it" if replace_flag else "remove it first"
            raise FileExistsError(f"{where} exists: choose another name, or {fix}")
    check_writable(path, where, inside=directory and path.is_dir())
    remove_temporaries(path if directory else path.parent, None if directory else path.name)
    return path


def check_writable(path: Path, where: str, inside=False) -> None:
    """Refuses a path that this process could not create: a folder on the way that is a file, a
    name too long, or a folder it cannot write in (found by writing a temporary file there);
    `inside`: the path is a directory that exists, to be written in."""
    folder, missing = (path, ["probe"]) if inside else (path.parent, [path.name])
    while not folder.is_dir():
        if folder.exists() or folder == folder.parent:
            raise ValueError(f"{where}: {folder} is a file, not a folder")
        missing.append(folder.name)
        folder = folder.parent
    limit = os.pathconf(folder, "PC_NAME_MAX")
    if too_long := [name for name in missing if len(os.fsencode(name)) > limit]:
        raise ValueError(f"{where}: the name {too_long[0][:40]}... is longer than its file system allows ({limit} bytes)")
    probe = temporary_of(folder / missing[-1])
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise ValueError(f"{where}: cannot write in {folder} ({error.strerror})") from None
    probe.unlink()


def os_error_of(error):
    """An error raised while writing -> an OSError if it says that a file could not be written (a
    full disk), else None. safetensors and torch.save do not raise OSError: safetensors reports the
    OS error in words, and torch's writer only that its stream failed."""
    if isinstance(error, OSError):
        return error
    message = " ".join(str(error).split())
    if isinstance(error, SafetensorError) and (code := re.search(r"os error (\d+)", message)):
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    if isinstance(error, RuntimeError) and re.search(r"unexpected pos|iostream error|failed writing", message):
        return OSError(errno.EIO, f"torch could not write a file, the disk may be full: {message.split('] . ')[-1]}")
    return None


def write_failed(path, error: OSError, resumes=False, hidden=None) -> OutputError:
    """`error`, raised while writing `path`, as one line naming `path` (never the temporary `hidden`)
    and saying what to do: on a full disk, free space and run the same command again; `resumes`:
    that command resumes where this one stopped."""
    reason = error.strerror or str(error)
    if hidden is not None:
        reason = reason.replace(str(hidden), str(path))
    advice = "; free space and run the same command again" if error.errno in FULL_DISK else ""
    if resumes:
        advice += (": it resumes" if advice else "; run the same command again: it resumes") + \
                  " where this one stopped, keeping what was written"
    return OutputError(f"cannot write {path}: {reason}{advice}", error.errno, error.strerror)


@contextmanager
def output_file(path, resumes=False):
    """Yields a temporary path beside `path` to write the file to; renames it onto `path` only if
    the block succeeds, so a reader sees the old file or the whole new one, never half of one.
    Creates the folder; removes the temporary however the block ends. A write that fails is an
    OutputError naming `path` (`write_failed`); an error about another file (an input read inside
    the block) passes as it is."""
    path = Path(path)
    tmp = temporary_of(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # from mkdir: a folder on the way is a file
        raise write_failed(path, OSError(errno.ENOTDIR, "a folder on its way is a file"), resumes) from None
    except OSError as error:
        raise write_failed(path, error, resumes, tmp) from None
    fcntl.flock(handle, fcntl.LOCK_EX)  # ours while this process lives: not a leftover (remove_temporaries)
    mode = tmp.stat().st_mode  # 0666 less the umask, as every file we write (safetensors writes 0600)
    try:
        yield tmp
        tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException as error:
        failure = None if isinstance(error, OutputError) else os_error_of(error)
        if failure is None or failure.filename not in (None, str(tmp), tmp):
            raise
        raise write_failed(path, failure, resumes, tmp) from error
    finally:
        tmp.unlink(missing_ok=True)
        os.close(handle)


@contextmanager
def output_dir(path, scaffolding=()):
    """Yields the directory `path`, created if need be. Should the block fail while the directory
    holds nothing but the files named in `scaffolding` (a job file that a rerun would check, say),
    nothing of the work was kept: those of them this call made go, and the folders it created, so
    that the failed command leaves nothing behind (and the corrected command starts afresh)."""
    path = Path(path)
    created = [folder for folder in (path, *path.parents) if not folder.exists()]
    made = [name for name in scaffolding if not (path / name).exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_failed(path, error) from None
    try:
        yield path
    except BaseException:
        remove_temporaries(path)
        if all(entry.name in scaffolding and entry.is_file() for entry in path.iterdir()):
            for name in made:
                (path / name).unlink(missing_ok=True)
            for folder in created:  # the deepest first
                with suppress(OSError):  # another process wrote into it meanwhile: it stays
                    folder.rmdir()
        raise
