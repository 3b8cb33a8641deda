"""What the trainers guarantee when things go wrong: SIGKILL at random moments and `--resume`,
a kill while the state is being saved, SIGTERM and Ctrl-C (also under `accelerate launch`), a full
disk, a NaN or infinite loss or gradient, and nonsensical budgets. Tiny models on 8x8 data."""

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.utils.other import load as load_weights_only  # torch.load(weights_only=True), numpy allowed
from safetensors.torch import load_file

from bench.common import PopenToFiles
from launch import launch_command, run_in_process
from pipelines import cli
from pipelines.data.datasets import ImageTensorDataset
from pipelines.infer.extract import extract_codes
from pipelines.store import run_files
from pipelines.store.checkpoint import PIXELSNAIL_KIND, VQVAE_KIND, load_checkpoint
from pipelines.train import run_state, runtime
from pipelines.train.pixels import TrainConfig
from pipelines.train.pixels import train as train_pixel
from pipelines.train.priors import PriorTrainConfig
from pipelines.train.priors import train as train_prior
from pipelines.train.vqvae import VQVAETrainConfig
from pipelines.train.vqvae import train as train_vqvae
from prior import PixelSNAIL
from vqvae import VQVAE2

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STEPS = 12
# Subprocesses run this checkout's packages (python puts scripts/ first on sys.path, not the
# checkout, so an editable install of another checkout would be imported instead), and, like this
# process here, one thread: tiny models run 10x faster so on a busy machine, and the runs in
# subprocesses and in this process compute the same numbers.
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(image_folder, smooth_pixels, tmp_path_factory):
    """40 smooth 8x8 images (an image folder), and a code database of 40 records made from them by
    a fixed function (2x2 top codes of 5, 4x4 bottom codes of 300, 3 classes): no VQ-VAE needed."""
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(image_folder, root / "images")
    images = torch.from_numpy(smooth_pixels).permute(0, 3, 1, 2).contiguous()

    def encode(batch):
        return batch[:, 0, ::4, ::4].long() % 5, (batch[:, 1, ::2, ::2].long() + batch[:, 2, ::2, ::2].long()) % 300

    plan = dict(top_shape=(2, 2), bottom_shape=(4, 4), top_codes=5, bottom_codes=300, n_classes=3,
                vqvae_sha256="ab" * 32, image_size=8, source={"data": "generated", "split": "train"})
    extract_codes(encode, ImageTensorDataset(images, torch.arange(40) % 3), root / "codes.lmdb", plan,
                  batch_size=8, progress=False)
    return root


# Each trainer: its script, its in-process train() and config, and tiny run options.
TRAINERS = {
    "pixel": ("scripts/train_pixelsnail.py", train_pixel, TrainConfig,
              dict(preset="tiny", dropout=0.3, n_samples=0)),
    "vqvae": ("scripts/train_vqvae.py", train_vqvae, VQVAETrainConfig,
              dict(preset="cpu-small", size=8, batch_size=4, n_images=0)),
    "prior": ("scripts/train_prior.py", train_prior, PriorTrainConfig,
              dict(level="bottom", preset="cpu-bottom", batch_size=4, dropout=0.3)),
}


def options(trainer, data, out, **changes):
    """The trainer's tiny run as config fields."""
    source = {"codes": str(data / "codes.lmdb")} if trainer == "prior" else {"data": str(data / "images")}
    fields = dict(out=str(out), steps=STEPS, precision="fp32", eval_every=1000, eval_batches=1, checkpoint_every=1)
    return {**source, **TRAINERS[trainer][3], **fields, **changes}


def config(trainer, data, out, **changes):
    return TRAINERS[trainer][2](**options(trainer, data, out, **changes))


def command(trainer, data, out, **changes):
    """The same run as a command line."""
    args = [TRAINERS[trainer][0]]
    for name, value in options(trainer, data, out, **changes).items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted runs (in this process), one per trainer, made when first asked for."""
    runs = {}

    def run(trainer):
        if trainer not in runs:
            runs[trainer] = tmp_path_factory.mktemp(f"reference-{trainer}")
            TRAINERS[trainer][1](config(trainer, data, runs[trainer]))
        return runs[trainer]

    return run


def assert_same_weights(run_dir, reference_dir):
    """model.safetensors and every tensor file of the state are bit-identical."""
    names = ["model.safetensors"] + [p.name for p in (reference_dir / "state").glob("*.safetensors")]
    assert len(names) >= 2
    for name in names:
        theirs = load_file(reference_dir / (name if name == "model.safetensors" else f"state/{name}"))
        ours = load_file(run_dir / (name if name == "model.safetensors" else f"state/{name}"))
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), f"{name}:{key} differs from the uninterrupted run"


def saved_step(run_dir):
    """The step of the state `--resume` would load, or None (none yet, or being renamed right now)."""
    try:
        return run_files.read_progress(run_dir)["step"]
    except (OSError, ValueError):
        return None


def assert_state_loads(run_dir):
    """The latest state is complete: progress, finite weights, optimizer and RNG files that load
    (as accelerate loads them: weights_only=True), and a model.safetensors that loads. Returns its step."""
    directory = run_files.state_dir(run_dir)
    step = json.loads((directory / run_files.PROGRESS_FILE).read_text())["step"]
    for path in directory.glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point())
    for path in [*directory.glob("*.bin"), *directory.glob("*.pkl")]:
        load_weights_only(path)
    assert (directory / "model.safetensors").is_file() and list(directory.glob("optimizer*.bin"))
    assert list(directory.glob("random_states_*.pkl"))
    model = run_dir / "model.safetensors"
    # written after the state it comes from: a kill in between leaves the previous checkpoint's
    # file, or none before the first write (the test that calls this checks it never disappears)
    if model.is_file():
        load_file(model)
    return step


def start(args):
    return PopenToFiles([PYTHON, *args], cwd=ROOT, env=ENV)


def wait_until(condition, process, timeout=120):
    """Polls until condition() holds or the process ends; True if the condition held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError("the training did not get there in time")


@pytest.mark.parametrize("trainer", TRAINERS)
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(trainer, data, reference, tmp_path):
    """The script, killed (SIGKILL) twice at random moments (after a random number of saved
    steps plus a random delay, so that kills land in steps and in saves) and resumed with
    --resume: after every kill the latest state loads, and the finished run's weights, optimizer
    and EMA are bit-identical to those of an uninterrupted run."""
    run_dir = tmp_path / "run"
    kill_twice_then_resume(trainer, data, run_dir, random.Random(f"kill-{trainer}"))
    assert_same_weights(run_dir, reference(trainer))


def kill_twice_then_resume(trainer, data, run_dir, rng, **changes):
    """Runs the trainer's script, kills it twice at random moments (`rng`), checking the state
    after each kill, and finishes the run in this process with --resume."""
    previous, model_seen = 0, False
    for _ in range(2):
        target, delay = previous + rng.randint(1, 3), rng.uniform(0.0, 0.05)
        process = start(command(trainer, data, run_dir, **changes) + (["--resume"] if previous else []))
        assert wait_until(lambda: (saved_step(run_dir) or 0) >= target, process), process.communicate()[1][-2000:]
        time.sleep(delay)
        process.kill()
        process.communicate(timeout=120)
        assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
        step = assert_state_loads(run_dir)
        assert previous < step < STEPS
        assert (run_dir / "model.safetensors").is_file() or not model_seen, "the model file disappeared"
        model_seen = (run_dir / "model.safetensors").is_file()
        previous = step
    TRAINERS[trainer][1](config(trainer, data, run_dir, resume=True, **changes))  # the last session, in this process
    assert saved_step(run_dir) == STEPS


@pytest.fixture(scope="module")
def three_levels(smooth_pixels, tmp_path_factory):
    """A three-level code database of the 40 smooth images, made by a fixed function like `data`'s
    (1x1 top codes of 5, 2x2 middle codes of 7, 4x4 bottom codes of 300, 3 classes), as codes.lmdb."""
    root = tmp_path_factory.mktemp("three-levels")
    images = torch.from_numpy(smooth_pixels).permute(0, 3, 1, 2).contiguous()

    def encode(batch):
        pixels = batch.long()
        bottom = (pixels[:, 1, ::2, ::2] + pixels[:, 2, ::2, ::2]) % 300
        return pixels[:, 0, ::8, ::8] % 5, pixels[:, 1, ::4, ::4] % 7, bottom

    plan = dict(levels=3, top_shape=(1, 1), middle_shape=(2, 2), bottom_shape=(4, 4), top_codes=5, middle_codes=7,
                bottom_codes=300, n_classes=3, vqvae_sha256="cd" * 32, image_size=8,
                source={"data": "generated", "split": "train"})
    extract_codes(encode, ImageTensorDataset(images, torch.arange(40) % 3), root / "codes.lmdb", plan,
                  batch_size=8, progress=False)
    return root


def test_a_middle_prior_killed_at_random_moments_resumes_exactly(three_levels, tmp_path):
    """As above, for the prior of the middle of three levels (conditioned on the top codes)."""
    TRAINERS["prior"][1](config("prior", three_levels, tmp_path / "reference", level="middle"))
    kill_twice_then_resume("prior", three_levels, tmp_path / "run", random.Random("kill-middle"), level="middle")
    assert_same_weights(tmp_path / "run", tmp_path / "reference")
    assert load_checkpoint(tmp_path / "run" / "model.safetensors", PIXELSNAIL_KIND)[2]["level"] == "middle"


class Killed(BaseException):
    """The simulated death of the process (not an Exception: nothing may catch it)."""


def test_a_kill_at_any_point_of_saving_leaves_a_complete_state(tmp_path, monkeypatch):
    """save_state is interrupted at each of its file operations in turn (a kill there: the
    operation and everything after it never happen; a directory removal dies half-way). Every time,
    the state to resume from is a complete one, the old or the new, with the weights of its step;
    and the next save succeeds and leaves no temporary directory behind."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))

    def save(run_dir, step):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        progress = {"step": step, "train_config": {}, "model_config": "{}"}
        run_state.save_state(accelerator, run_dir, progress, ema=model)

    def load(run_dir):
        progress = run_state.load_state(accelerator, run_dir, ema=model)
        assert all(torch.all(p == progress["step"]) for p in model.parameters()), "weights of another step"
        return progress["step"]

    real = {"replace": os.replace, "rmtree": shutil.rmtree, "save_state": accelerator.save_state,
            "save_file": run_state.save_file}

    def interruptible(name, counter):
        def operation(*args, **kwargs):
            if counter["dead"]:
                raise Killed
            counter["calls"] += 1
            if counter["calls"] == counter["kill_at"]:
                counter["dead"] = True
                killed_in.add(name)
                if name == "rmtree":  # dies half-way through removing the directory
                    files = sorted(Path(args[0]).rglob("*"))
                    for path in files[: len(files) // 2]:
                        if path.is_file():
                            path.unlink()
                if name == "save_state":  # dies after accelerate wrote its files
                    real[name](*args, **kwargs)
                raise Killed
            return real[name](*args, **kwargs)
        return operation

    kill_points, killed_in = 0, set()
    for kill_at in range(1, 20):
        run_dir = tmp_path / f"run{kill_at}"
        save(run_dir, 2)  # the state the interrupted save replaces
        counter = {"calls": 0, "kill_at": kill_at, "dead": False}
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", interruptible("replace", counter))
            patch.setattr(shutil, "rmtree", interruptible("rmtree", counter))
            patch.setattr(accelerator, "save_state", interruptible("save_state", counter))
            patch.setattr(run_state, "save_file", interruptible("save_file", counter))
            try:
                save(run_dir, 3)
            except Killed:
                pass
        if not counter["dead"]:
            break
        kill_points += 1
        assert load(run_dir) in (2, 3), f"kill at operation {kill_at}"
        save(run_dir, 4)
        assert load(run_dir) == 4
        assert sorted(p.name for p in run_dir.iterdir()) == ["state"]
    assert kill_points >= 5  # save_state, EMA file, rename old away, rename new in, remove old
    assert killed_in == set(real), "a patched operation the save never calls (a stale patch target?)"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_the_state_and_exit(signum, data, reference, tmp_path):
    """The signal lands mid-run (checkpoints every 1000 steps, so only the stop saves): the
    script saves the state of the step it was on, says so in one line and exits 128 + signal
    (143 / 130). Resumed, the run ends bit-identical to an uninterrupted one."""
    run_dir = tmp_path / "run"
    process = start(command("pixel", data, run_dir, checkpoint_every=1000, eval_every=1))
    log = run_dir / "log.jsonl"
    assert wait_until(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    stopped = re.fullmatch(rf"stopped by {signal.Signals(signum).name} at step (\d+), state saved: continue with --resume",
                           last_line)
    assert stopped, last_line
    assert "Traceback" not in stderr
    step = int(stopped.group(1))
    assert 2 <= step < STEPS and assert_state_loads(run_dir) == step
    assert load_checkpoint(run_dir, PIXELSNAIL_KIND)[2]["step"] == step

    train_pixel(config("pixel", data, run_dir, resume=True))
    assert_same_weights(run_dir, reference("pixel"))


def test_a_second_ctrl_c_stops_at_once():
    """The first SIGINT (or SIGTERM) only sets the flag; a second SIGINT raises KeyboardInterrupt
    (cli.run: "interrupted", exit 130), a second SIGTERM changes nothing. The previous handlers
    are back afterwards."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with runtime.StopSignals() as signals:
        assert signals.received == 0
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with runtime.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def worker_pids(launcher_pid):
    """{rank: pid} of the processes `accelerate launch` started (children with RANK in their env)."""
    workers = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == launcher_pid:
                env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
                workers[int(env["RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return workers


@pytest.mark.parametrize("how", ["SIGTERM to rank 1 only", "Ctrl-C to the process group"])
def test_two_processes_stop_at_the_same_step(how, data, tmp_path):
    """Under `accelerate launch` with two processes, a signal to one worker stops both at the
    same step (the flag is all-gathered every step), and so does a terminal's Ctrl-C (sent to the
    launcher's process group; torchrun forwards it to its workers): both processes report the
    same step, and its state is saved by both (one RNG file each)."""
    run_dir = tmp_path / "run"
    args = command("pixel", data, run_dir, checkpoint_every=1000, eval_every=1, steps=200)
    process = PopenToFiles(launch_command(2, *args), cwd=ROOT, env=ENV, start_new_session=True)
    try:
        log = run_dir / "log.jsonl"
        assert wait_until(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, process)
        if how.startswith("SIGTERM"):
            signum = signal.SIGTERM
            os.kill(worker_pids(process.pid)[1], signum)
        else:
            signum = signal.SIGINT
            os.killpg(process.pid, signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    name = signal.Signals(signum).name
    steps = re.findall(rf"stopped by {name} at step (\d+), state saved", stderr)  # one line per process
    assert len(steps) == 2 and steps[0] == steps[1], stderr[-3000:]
    assert process.returncode != 0  # the launcher reports its workers' exit (143 / 130) as a failure
    assert assert_state_loads(run_dir) == int(steps[0]) < 200
    assert sorted(p.name for p in run_files.state_dir(run_dir).glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk_on_call(failing_call, written):
    """A fault for `faults.inject`: the writer (taking (obj, path, ...)), on its `failing_call`-th
    call, writes a few bytes and then fails as a full disk does."""

    def make(function, fired):
        calls = {"n": 0}

        def writer(obj, path, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == failing_call:
                fired()
                Path(path).write_bytes(b"\0" * 10)
                written.append(Path(path))
                raise ENOSPC
            return function(obj, path, *args, **kwargs)

        return writer

    return make


def run_cli(train, cfg, capsys):
    """train(cfg) as a script runs it (cli.run): (exit status, the last line on stderr), after
    checking that stderr holds no traceback (only the progress bar before that line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: train(cfg))
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and stderr.count("error:") == 1
    return exit_info.value.code, stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("trainer, writer, state_kept", [
    ("pixel", "torch.save", 2),                   # accelerate's optimizer file, inside the new state
    ("pixel", "run_state.save_file", 2),           # our EMA file, inside the new state
    ("pixel", "checkpoint.save_file", 4),         # model.safetensors, after the state was saved
    ("vqvae", "torch.save", 2),
])
def test_a_full_disk_while_saving_keeps_the_previous_state(trainer, writer, state_kept, data, reference, tmp_path,
                                                          monkeypatch, faults, capsys):
    """ENOSPC in the middle of the second save (step 4; saves every 2 steps): one line naming the
    step, the error and the state kept, exit status 2; the state and model.safetensors on disk
    are complete and resumable, nothing half-written is left, and the resumed run ends
    bit-identical to an uninterrupted one."""
    import pipelines.store.checkpoint

    module, name = {"torch.save": (torch, "save"), "run_state.save_file": (run_state, "save_file"),
                    "checkpoint.save_file": (pipelines.store.checkpoint, "save_file")}[writer]
    train = TRAINERS[trainer][1]
    run_dir, written = tmp_path / "run", []
    train(config(trainer, data, run_dir, steps=2, checkpoint_every=2))
    assert saved_step(run_dir) == 2
    faults.inject(module, name, full_disk_on_call(1, written))
    status, last_line = run_cli(train, config(trainer, data, run_dir, checkpoint_every=2, resume=True), capsys)
    monkeypatch.undo()
    assert status == 2 and written
    assert last_line == (f"error: saving step 4 in {run_dir} failed (No space left on device); "
                      f"the state of step {state_kept} is kept")
    assert assert_state_loads(run_dir) == state_kept
    assert load_checkpoint(run_dir, VQVAE_KIND if trainer == "vqvae" else PIXELSNAIL_KIND)[2]["step"] == 2
    assert sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")) == []

    train(config(trainer, data, run_dir, resume=True))
    assert_same_weights(run_dir, reference(trainer))



def poison_training_call(faults, cls, method, at_call, poison):
    """Makes the `at_call`-th call of cls.method in training mode return poison(its result)."""

    def make(original, fired):
        calls = {"n": 0}

        def poisoned(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if self.training and torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == at_call:
                    fired()
                    return poison(result)
            return result

        return poisoned

    faults.inject(cls, method, make)


def test_global_means_reduces_several_losses_at_once_and_stops_on_any_non_finite():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert runtime.global_means(accelerator, 1, torch.tensor(0.5), torch.tensor(2.0, dtype=torch.bfloat16)) == [0.5, 2.0]
    with pytest.raises(FloatingPointError, match="the loss is inf at step 7"):
        runtime.global_means(accelerator, 7, torch.tensor(0.5), torch.tensor(math.inf))


@pytest.mark.parametrize("trainer, what, message", [
    ("pixel", "nan loss", "the loss is nan at step 3"),
    ("pixel", "inf gradient", "the gradient norm is (inf|nan) at step 3"),  # inf * 0 -> nan on the way
    ("prior", "nan loss", "the loss is nan at step 3"),
    ("vqvae", "nan loss", "the loss is nan at step 3"),
])
def test_a_nan_or_infinite_loss_stops_the_run_and_keeps_the_checkpoint(trainer, what, message, data, tmp_path,
                                                                      faults, capsys):
    """The loss of step 3 (or its gradient) is made non-finite: the run stops with one line
    naming the step, exit status 2, before the update; the state and model.safetensors stay those
    of step 2, with finite weights."""
    run_dir = tmp_path / "run"
    if trainer == "vqvae":
        poison_training_call(faults, VQVAE2, "forward", 3, lambda out: out._replace(loss=out.loss * math.nan))
    elif what == "nan loss":
        poison_training_call(faults, PixelSNAIL, "output_nll", 3, lambda bits: bits * math.nan)
    else:
        def infinite_gradient(bits):
            bits.register_hook(lambda g: torch.full_like(g, math.inf))
            return bits
        poison_training_call(faults, PixelSNAIL, "output_nll", 3, infinite_gradient)
    status, last_line = run_cli(TRAINERS[trainer][1], config(trainer, data, run_dir, checkpoint_every=2), capsys)
    assert status == 2
    assert re.fullmatch(f"error: {message}: stopped before updating the weights; the last checkpoint is kept", last_line)
    assert assert_state_loads(run_dir) == 2
    state, _, extra = load_checkpoint(run_dir, VQVAE_KIND if trainer == "vqvae" else PIXELSNAIL_KIND)
    assert extra["step"] == 2 and all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


BAD_VALUES = [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-5"], "--steps must be >= 1, got -5"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
    (["--max-minutes", "-1"], "--max-minutes must be > 0, got -1.0"),
    (["--max-minutes", "0"], "--max-minutes must be > 0, got 0.0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
    (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
    (["--eval-batches", "0"], "--eval-batches must be >= 1, got 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--grad-clip", "-1"], "--grad-clip must be > 0"),
]


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("bad, message", BAD_VALUES, ids=[" ".join(b) for b, _ in BAD_VALUES])
def test_nonsensical_budgets_are_refused_before_anything_is_written(trainer, bad, message, data, tmp_path):
    """Each script, run as from the command line (in this process), refuses the value with one
    line naming it and exit status 2, and creates no run directory."""
    run_dir = tmp_path / "run"
    status, stderr = run_script(command(trainer, data, run_dir) + bad)
    assert status == 2
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1, stderr
    assert not run_dir.exists()


def run_script(args):
    """A script run as from the command line, in this process: (exit status, stderr)."""
    result = run_in_process(*args)
    return result.returncode, result.stderr


def test_a_bottom_prior_resumes_without_level(data, tmp_path):
    """`train_prior.py --codes C --out RUN --resume` takes the level (and every other setting that
    defines the run) from RUN, before it opens the code database."""
    run_dir = tmp_path / "run"
    train_prior(config("prior", data, run_dir, steps=2))
    status, stderr = run_script(["scripts/train_prior.py", "--codes", str(data / "codes.lmdb"), "--out", str(run_dir),
                                 "--resume", "--steps", "4", "--precision", "fp32"])
    assert status == 0, stderr[-2000:]
    progress = run_files.read_progress(run_dir)
    assert progress["step"] == 4
    assert {k: progress["train_config"][k] for k in ("level", "preset", "batch_size")} == dict(
        level="bottom", preset="cpu-bottom", batch_size=4)


@pytest.mark.parametrize("trainer, option, value, message", [
    ("prior", "--preset", "cpu-top", "--preset cpu-top differs from the run's preset cpu-bottom"),
    ("prior", "--batch-size", "8", "--batch-size 8 differs from the run's batch_size 4"),
    ("prior", "--level", "top", "--level top differs from the run's level bottom"),
    ("pixel", "--batch-size", "2", "--batch-size 2 differs from the run's batch_size 8"),
    ("vqvae", "--lr", "0.1", "--lr 0.1 differs from the run's lr 0.0003"),
])
def test_resuming_with_a_conflicting_run_setting_is_refused(trainer, option, value, message, data, tmp_path):
    """A setting that defines the run, given on resume with another value than the run's, is refused
    in one line (exit 2) and nothing is trained; given with the run's own value, it is accepted."""
    run_dir = tmp_path / "run"
    TRAINERS[trainer][1](config(trainer, data, run_dir, steps=2))
    source = ["--codes", str(data / "codes.lmdb")] if trainer == "prior" else ["--data", str(data / "images")]
    args = [TRAINERS[trainer][0], *source, "--out", str(run_dir), "--resume", "--steps", "3", "--precision", "fp32"]
    status, stderr = run_script(args + [option, value])
    assert status == 2 and "Traceback" not in stderr and stderr.count("\n") == 1, stderr[-2000:]
    assert stderr.startswith(f"error: {message} ({run_dir}): ")
    assert saved_step(run_dir) == 2
    stored = str(run_files.read_progress(run_dir)["train_config"][option[2:].replace("-", "_")])
    status, stderr = run_script(args + [option, stored])
    assert status == 0 and saved_step(run_dir) == 3, stderr[-2000:]


def test_a_kill_mid_accumulation_then_resume_equals_an_uninterrupted_run(data, tmp_path, monkeypatch, faults):
    """With --grad-accum 2, the run dies (a simulated kill) inside step 3, after the backward of its
    first batch and before that of its second: the state on disk stays step 2's, and the resumed
    run ends bit-identical to an uninterrupted one (weights, optimizer, EMA)."""
    accumulating = dict(grad_accum=2, steps=4)
    train_prior(config("prior", data, tmp_path / "reference", **accumulating))

    def die(bits):
        raise Killed

    run_dir = tmp_path / "run"
    poison_training_call(faults, PixelSNAIL, "output_nll", 2 * 2 + 2, die)
    with pytest.raises(Killed):
        train_prior(config("prior", data, run_dir, **accumulating))
    monkeypatch.undo()
    assert saved_step(run_dir) == 2
    train_prior(config("prior", data, run_dir, resume=True, **accumulating))
    assert saved_step(run_dir) == 4
    assert_same_weights(run_dir, tmp_path / "reference")


@pytest.mark.parametrize("trainer", TRAINERS)
def test_report_to_tensorboard_logs_what_the_log_file_logs(trainer, data, tmp_path):
    """--report-to tensorboard: accelerate's TensorBoard tracker holds, at each evaluation's step,
    every number of that log.jsonl line (read back with TensorBoard's own event reader)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir = tmp_path / "run"
    TRAINERS[trainer][1](config(trainer, data, run_dir, steps=4, eval_every=2, report_to="tensorboard"))
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for record in records:
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                logged = {event.step: event.value for event in events.Scalars(name)}
                assert logged[record["step"]] == pytest.approx(float(value), rel=1e-6), name


def test_no_tracker_by_default(data, tmp_path):
    train_pixel(config("pixel", data, tmp_path / "run", steps=2))
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_an_injected_fault_that_never_fires_is_reported(monkeypatch):
    """The `faults` fixture's own check: a patch of a function nothing calls counts as unfired."""
    from conftest import Faults

    faults = Faults(monkeypatch)
    faults.inject(run_state, "save_file", lambda original, fired: lambda *a, **k: (fired(), original(*a, **k))[1])
    assert faults.unfired() == ["pipelines.train.run_state.save_file"]
