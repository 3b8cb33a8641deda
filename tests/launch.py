"""Running the project's scripts in tests: as one process, or as several real CPU processes under
`accelerate launch`."""

import socket
import subprocess
import sys
from pathlib import Path


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


def ok(*args, processes=1):
    """`run_script` that must succeed -> its standard output."""
    result = run_script(*args, processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
