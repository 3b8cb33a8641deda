"""The one way a benchmark runs another program, alone or several at once.

A child's stdout and stderr go to unnamed temporary files, read once it has exited. A pipe holds
64 KiB: a child that writes more (a progress bar writes ~150 bytes a step) blocks until someone
reads it, so a parent that waits on something else first (another child, a file) stalls it. Bench
streams did: it read its workers' pipes one after the other, and the two-stream worker stopped
at step 435 of every run until the one-stream worker had exited. A file never fills up: the
children run side by side, undisturbed, and are collected in any order.
"""

import shlex
import subprocess
import sys
import tempfile
import time

from bench.common.machine import ROOT


class PopenToFiles(subprocess.Popen):
    """subprocess.Popen with the child's stdout and stderr in unnamed temporary files, not pipes (see
    the module's docstring); communicate() waits for the child and returns both as text. The tests
    start their long-running children with it too."""

    def __init__(self, args, **kwargs):
        self.outputs = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # stdout, stderr
        super().__init__([str(word) for word in args], stdin=subprocess.DEVNULL, stdout=self.outputs[0],
                         stderr=self.outputs[1], **kwargs)

    def communicate(self, input=None, timeout=None):
        assert input is None, "a PopenToFiles child reads no input"
        self.wait(timeout)
        texts = []
        for output in self.outputs:
            output.seek(0)
            texts.append(output.read().decode(errors="replace"))
        return tuple(texts)

    def close(self):
        """Kills the child if it still runs, and lets go of its output files."""
        if self.poll() is None:
            self.kill()
            self.wait()
        for output in self.outputs:
            output.close()


def finish(child, timeout=None, check=True):
    """Waits for a PopenToFiles child -> its CompletedProcess, stdout and stderr as text. After
    `timeout` seconds the child is killed and subprocess.TimeoutExpired raised; check: a child that
    failed raises RuntimeError with the end of its stderr."""
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.close()
        raise
    if check and child.returncode:
        raise RuntimeError(f"{shlex.join(child.args)} failed (exit status {child.returncode}):\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def run_together(commands, timeout=None, check=True, cwd=ROOT, env=None):
    """Starts every command at once, then collects them -> their CompletedProcess, in order.
    timeout: seconds for all of them together; a timeout or a failure (check) kills the others."""
    deadline = None if timeout is None else time.monotonic() + timeout
    children = []
    try:
        for command in commands:
            children.append(PopenToFiles(command, cwd=cwd, env=env))
        return [finish(child, None if deadline is None else max(0.0, deadline - time.monotonic()), check)
                for child in children]
    finally:
        for child in children:
            child.close()


def run_command(command, timeout=None, check=True, cwd=ROOT, env=None):
    """One command, run to its end -> its CompletedProcess (see run_together)."""
    return run_together([command], timeout, check, cwd, env)[0]


def run_script(*args):
    """`python ARGS` from the repository root (a script's path first) -> its standard output; a
    failure raises RuntimeError with the end of its stderr."""
    return run_command([sys.executable, *args]).stdout


def last_line_value(output, prefix):
    """The number after `prefix` on the last line of a command's output that starts with it."""
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    if not lines:
        raise RuntimeError(f"no line starting with {prefix!r} in:\n{output[-2000:]}")
    return float(lines[-1][len(prefix):])
