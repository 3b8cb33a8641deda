"""The one training loop's step: gradient accumulation (the loop itself runs in every trainer's tests)."""

import pytest
import torch

from pipelines.train import runtime
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
