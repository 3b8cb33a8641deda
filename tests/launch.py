"""The command that starts a script as several real CPU processes under `accelerate launch`."""

import socket
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
