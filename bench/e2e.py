"""The main job end to end through the scripts, stage by stage, pass or fail: what `make gpu-check`
runs first on a CUDA machine (`--device cuda`), and the tests run on the CPU (`--device cpu`).

Stages, each a script run as a user would run it, on a tiny image folder of two classes: VQ-VAE
training; code extraction; the top and the bottom prior, each under `accelerate launch`; a prior
run killed (SIGKILL) after its first saved state and resumed with --resume; sampling to --out-dir
(--batch-size auto, --capture on CUDA); evaluation of the prior and of the samples. A stage passes
when its script exits 0 and what it wrote is there; a failed stage's last output line is kept.
Later stages that need a failed one's output are skipped.

    python -m bench.e2e --device cuda --out bench/results     # gpu-e2e.md and .json
    python -m bench.e2e --device cpu --out /tmp/e2e           # the same on the CPU, about a minute
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import Report, machine_info

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
SHORT = ["--batch-size", "4", "--steps", str(STEPS), "--eval-every", str(STEPS)]


def make_images(root):
    """Two classes of 24 32x32 images in class folders."""
    rng = np.random.default_rng(0)
    for label, colour in enumerate(([200, 40, 40], [40, 40, 200])):
        (root / str(label)).mkdir(parents=True)
        for k in range(24):
            image = np.array(colour) * rng.uniform(0.5, 1.0) + rng.normal(0, 10, (32, 32, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / str(label) / f"{k}.png")


def launch(device, *args):
    """`accelerate launch` of one process on the device (a single GPU, or the CPU)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    where = ["--num_processes", "1"] if device == "cuda" else ["--cpu", "--num_processes", "1"]
    return [str(accelerate), "launch", *where, "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", *args]


def last_line(text):
    """The last line of a command's output that is neither blank nor a progress bar's."""
    lines = [line for line in text.strip().splitlines() if line.strip() and "%|" not in line]
    return lines[-1] if lines else ""


class Stages:
    """Runs the stages in order, recording each: name -> {passed, seconds, last line}."""

    def __init__(self, device, work, timeout):
        self.device, self.work, self.timeout = device, work, timeout
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the trainers take CUDA wherever they see it
        self.results = []

    def run(self, name, command, check=lambda: True, needs=()):
        failed = [r["stage"] for r in self.results if r["stage"] in needs and not r["passed"]]
        if failed:
            self.results.append({"stage": name, "passed": False, "seconds": 0, "note": f"skipped: {failed[0]} failed"})
            return
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=self.timeout)
            passed = done.returncode == 0 and check()
            # a pass: the stage's result line (stdout); a failure: its error (stderr; launchers warn there too)
            note = last_line(done.stdout or done.stderr) if passed else (
                f"exit {done.returncode}: {last_line(done.stderr or done.stdout)}")
        except subprocess.TimeoutExpired:
            passed, note = False, f"timed out after {self.timeout} s"
        self.results.append({"stage": name, "passed": passed, "seconds": time.perf_counter() - start, "note": note[:300]})
        print(f"{'PASS' if passed else 'FAIL'} {name}: {note[:200]}", flush=True)

    def kill_and_resume(self, name, command, needs=()):
        """The command (a long run) started, SIGKILLed once its first state is saved, then run again with
        --resume to two steps past the saved one."""
        progress = self.work / "killed" / "state" / "progress.json"
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        while not progress.exists() and process.poll() is None and time.perf_counter() - start < self.timeout:
            time.sleep(0.05)
        killed = process.poll() is None
        if killed:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if not killed:
            self.results.append({"stage": name, "passed": False, "seconds": time.perf_counter() - start,
                                 "note": f"the run ended (exit {process.returncode}) before a state was saved"})
            return
        step = json.loads(progress.read_text())["step"]
        self.run(name, [*command, "--resume", "--steps", str(step + 2)],
                 check=lambda: json.loads(progress.read_text())["step"] > step,
                 needs=needs)
        self.results[-1]["note"] = f"killed at step {step}; resumed: {self.results[-1]['note']}"


def run_stages(device, work, timeout):
    python, w = sys.executable, work
    make_images(w / "images")
    stages = Stages(device, w, timeout)
    precision = ["--precision", "bf16" if device == "cuda" else "fp32"]
    stages.run("VQ-VAE training", [python, "scripts/train_vqvae.py", "--data", str(w / "images"), "--preset", "cpu-small",
                                   "--size", "32", "--out", str(w / "vqvae"), *SHORT, *precision],
               check=lambda: (w / "vqvae" / "model.safetensors").exists())
    stages.run("extraction", [python, "scripts/extract_codes.py", "--vqvae", str(w / "vqvae"), "--data",
                              str(w / "images"), "--out", str(w / "codes.lmdb"), "--device", device],
               check=lambda: (w / "codes.lmdb").exists(), needs=["VQ-VAE training"])
    for level in ("top", "bottom"):
        stages.run(f"{level} prior (accelerate launch)",
                   launch(device, "scripts/train_prior.py", "--codes", str(w / "codes.lmdb"), "--level", level, "--preset",
                          f"cpu-{level}", "--out", str(w / level), *SHORT, *precision),
                   check=lambda level=level: (w / level / "model.safetensors").exists(), needs=["extraction"])
    stages.kill_and_resume("SIGKILL and resume", [
        python, "scripts/train_prior.py", "--codes", str(w / "codes.lmdb"), "--level", "top", "--preset", "cpu-top",
        "--out", str(w / "killed"), "--batch-size", "4", "--steps", "1000", "--eval-every", "1000",
        "--checkpoint-every", "2", *precision], needs=["extraction"])
    pipeline = ["--vqvae", str(w / "vqvae"), "--top", str(w / "top"), "--bottom", str(w / "bottom")]
    stages.run("sampling to --out-dir", [
        python, "scripts/sample.py", *pipeline, "--label", "all", "--n", "4", "--batch-size", "auto",
        "--out-dir", str(w / "samples"), "--device", device, *(["--capture"] if device == "cuda" else [])],
        check=lambda: (w / "samples" / "fid_images.npz").exists(), needs=["top prior (accelerate launch)",
                                                                          "bottom prior (accelerate launch)"])
    stages.run("evaluation: prior", [python, "scripts/evaluate.py", "prior", "--ckpt", str(w / "top"), "--codes",
                                     str(w / "codes.lmdb"), "--device", device],
               needs=["top prior (accelerate launch)"])
    stages.run("evaluation: samples", [python, "scripts/evaluate.py", "samples", "--samples", str(w / "samples"),
                                       "--data", str(w / "images"), "--per-class", "2", "--classifier-steps", "5",
                                       "--device", device], needs=["sampling to --out-dir"])
    return stages.results


def table(results):
    rows = [(r["stage"], "pass" if r["passed"] else "FAIL", f"{r['seconds']:.1f}", r["note"]) for r in results["stages"]]
    passed = sum(r["passed"] for r in results["stages"])
    return (("stage", "result", "seconds", "last line"), rows,
            [f"{passed} of {len(rows)} stages passed on {results['device']} ({results.get('gpu', 'no GPU')}), "
             f"{sum(r['seconds'] for r in results['stages']):.0f} s in all"])


REPORT = Report("gpu-e2e", "The main job end to end through the scripts", table)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where gpu-e2e.md and .json go")
    p.add_argument("--timeout", type=int, default=240, help="seconds per stage (default 240)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="e2e-") as work:
        results = {**machine_info(), "command": "python -m bench.e2e " + " ".join(argv or sys.argv[1:]),
                   "device": args.device, "stages": run_stages(args.device, Path(work), args.timeout)}
    if args.device == "cuda":
        import torch

        results["gpu"] = torch.cuda.get_device_name()
    REPORT.publish(results, args.out)
    return 0 if all(r["passed"] for r in results["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
