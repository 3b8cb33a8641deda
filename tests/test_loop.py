"""The one training loop's step: gradient accumulation (the loop itself runs in every trainer's tests);
every trainer computing denormals as zero."""

import pytest
import torch

from pipelines import device
from pipelines.train import pixels, priors, runtime, vqvae
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
    out = str(tmp_path / "run")
    module, config = {
        "pixels": (pixels, pixels.TrainConfig(data=str(tiny_pipeline / "images"), preset="tiny", out=out)),
        "priors": (priors, priors.PriorTrainConfig(codes=str(tiny_pipeline / "codes.lmdb"), preset="tiny", out=out)),
        "vqvae": (vqvae, vqvae.VQVAETrainConfig(data=str(tiny_pipeline / "images"), size=16, preset="cpu-small",
                                                     out=out)),
    }[trainer]
    seen = []
    monkeypatch.setattr(module, "fit", lambda task: seen.append((device.flushes_denormals(), len(task.train_set))))
    module.train(config)
    assert seen and seen[0][0] and seen[0][1] > 0
    assert not device.flushes_denormals()
