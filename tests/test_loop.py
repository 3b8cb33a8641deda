"""The one training loop's step: gradient accumulation (the loop itself runs in every trainer's tests);
every trainer computing denormals as zero."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import device
from pipelines.train import loop, pixels, priors, runtime, vqvae
from pipelines.train.loop import Step, train_step


def mse_loss(model, batch):
    inputs, targets = batch
    error = (model(inputs) - targets).square().mean()
    return Step(error, error)


def test_accumulated_batches_make_the_step_of_their_union():
    """With grad_accum=2, one step over two batches of 4 updates the weights as one step over the
    8 examples together: each batch's loss counts half, the update comes after both."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    weights, shown = [], []
    for accum, batches in ((2, [(x[:4], y[:4]), (x[4:], y[4:])]), (1, [(x, y)])):
        torch.manual_seed(1)
        accelerator = runtime.make_accelerator("fp32", grad_accum=accum)
        model = torch.nn.Linear(3, 1)
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        mean, _ = train_step(accelerator, model, optimizer, mse_loss, iter(batches), 0, grad_clip=1e9)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        shown.append(mean)
    initial = torch.cat([p.detach().flatten() for p in torch.nn.Linear(3, 1).parameters()])
    assert not torch.allclose(weights[0], initial)
    assert torch.allclose(weights[0], weights[1], atol=1e-6)
    assert shown[0] == pytest.approx(shown[1])


@pytest.mark.parametrize("before", [False, True])
def test_denormals_are_flushed_inside_the_block_and_the_flag_is_put_back_as_it_was(before):
    torch.set_flush_denormal(before)
    try:
        assert device.flushes_denormals() == before
        with device.flush_denormals():
            assert device.flushes_denormals()
            tiny = torch.tensor([1 << 20], dtype=torch.int32).view(torch.float32)
            assert (tiny * 1.0).item() == 0.0 and (tiny + tiny).item() == 0.0
        assert device.flushes_denormals() == before
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("trainer", ["pixels", "priors", "vqvae"])
def test_every_trainer_trains_with_denormals_flushed_and_puts_the_flag_back(trainer, tiny_pipeline, monkeypatch,
                                                                            tmp_path):
    run = dict(out=str(tmp_path / "run"), precision="fp32")  # bf16 would need a process of its own (accelerate)
    module, config = {
        "pixels": (pixels, pixels.TrainConfig(data=str(tiny_pipeline / "images"), preset="tiny", **run)),
        "priors": (priors, priors.PriorTrainConfig(codes=str(tiny_pipeline / "codes.lmdb"), preset="tiny", **run)),
        "vqvae": (vqvae, vqvae.VQVAETrainConfig(data=str(tiny_pipeline / "images"), size=16, preset="cpu-small",
                                                     **run)),
    }[trainer]
    seen = []

    def start(task, *args):  # the loop's first step once its checks are done: records the flag, stops the run
        seen.append((device.flushes_denormals(), len(task.train_set)))
        raise Probed

    monkeypatch.setattr(loop, "start", start)
    with pytest.raises(Probed):
        module.train(config)
    assert seen and seen[0][0] and seen[0][1] > 0
    assert not device.flushes_denormals()


class Probed(Exception):
    """Stops a trainer that has shown what the test looks at."""


ROOT = Path(__file__).resolve().parents[1]
# whether this thread, some thread and every thread (the intra-op ones and this one) compute denormals as zero
PROBE = ("print(device.flushes_denormals(), device.some_thread_flushes_denormals(), "
         "bool((device.denormal_probe(1 << 22) * 1.0).view(torch.int32).eq(0).all()))")


def in_new_process(code, *args):
    """`code` (which may print PROBE's line) run by a new interpreter with two threads -> the words it printed."""
    setup = "import sys, torch\nfrom pipelines import device\nfrom pipelines.device import *\ntorch.set_num_threads(2)\n"
    result = subprocess.run([sys.executable, "-c", setup + code, *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_the_trainers_flush_never_reaches_threads_that_outlive_it():
    """Threads started in the block would keep its flag: flush_denormals starts them before setting it."""
    assert in_new_process(f"with flush_denormals():\n    torch.ones(1 << 22).mul_(2)\n{PROBE}") == ["False"] * 3


def test_a_training_process_starts_its_threads_flushing_and_its_own_thread_as_it_was():
    assert in_new_process(f"flush_denormals_in_thread_pool()\n{PROBE}") == ["False", "True", "False"]
    assert in_new_process(f"flush_denormals_in_thread_pool()\ntorch.set_num_threads(1)\n{PROBE}") == ["False"] * 3


@pytest.mark.parametrize("script", ["train_pixelsnail", "train_prior", "train_vqvae"])
def test_every_training_script_trains_with_every_thread_flushing_denormals(script, tiny_pipeline, tmp_path):
    """The script in a process of its own, its training loop's start replaced by a probe of the threads."""
    data = {"train_pixelsnail": ["--data", tiny_pipeline / "images", "--preset", "tiny"],
            "train_prior": ["--codes", tiny_pipeline / "codes.lmdb"],
            "train_vqvae": ["--data", tiny_pipeline / "images", "--size", "16"]}[script]
    run_with_probe = f"""import runpy
from pipelines.train import loop
def start(*args):
    {PROBE}
    sys.exit(0)
loop.start = start
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    printed = in_new_process(run_with_probe, f"scripts/{script}.py", "--out", tmp_path / "run", *data)
    assert printed[-3:] == ["True"] * 3
