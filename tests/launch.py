"""Running the project's scripts in tests: as one process, as several real CPU processes under
`accelerate launch`, or in this process (runpy), as `python scripts/X.py` would run them. (A child
a test waits on while it runs starts as bench.common.PopenToFiles, whose output never blocks it.)"""

import io
import runpy
import signal
import socket
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch


def free_port():
    """A TCP port nobody listens on now: parallel launches (other test runs) must not share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(processes, *args):
    """accelerate launch for `processes` CPU processes (--multi_gpu: --cpu would start only one)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]


ROOT = Path(__file__).resolve().parents[1]


def run_script(*args, processes=1):
    """Runs `python <args>` (a script path first) from the repository root, or launches it as
    `processes` CPU processes -> the CompletedProcess, output captured."""
    command = [sys.executable, *args] if processes == 1 else launch_command(processes, *args)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def drain(pipe):
    """Reads the rest of `pipe` in a background thread: once a test has read what it needed from a
    child's output, waiting on the child can no longer leave it blocked on a full pipe."""
    threading.Thread(target=pipe.read, daemon=True).start()


def run_in_process(*args):
    """`run_script(*args)` in this process -> the same CompletedProcess, without the seconds a new
    interpreter spends importing torch and accelerate. The script path is relative to the
    repository root, the other paths to the current directory. What a script sets for the whole
    process is put back after it: sys.argv, the SIGINT and SIGTERM handlers, torch's thread count.
    What stays is what a process can set only once: accelerate's state (its mixed precision: a
    bf16 run needs a process of its own) and lmdb's open databases (a database this process has
    read cannot be written by a script in it)."""
    script = str(ROOT / args[0])
    saved_argv, threads = sys.argv, torch.get_num_threads()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = [script, *map(str, args[1:])]
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as exit_:
        status = exit_.code or 0
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(threads)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return subprocess.CompletedProcess([sys.executable, *args], status, stdout.getvalue(), stderr.getvalue())


def ok(*args, processes=1, in_process=False):
    """`run_script` (or `run_in_process`) that must succeed -> its standard output."""
    result = run_in_process(*args) if in_process else run_script(*args, processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
