"""prior.modes: a module's mode switched for a while, and restored however the block ends."""

import pytest
import torch

from prior import PixelSNAIL, PixelSNAILConfig
from prior.modes import evaluating
from prior.sampling import sample_cached


def test_evaluating_restores_the_previous_mode_also_when_the_block_raises():
    model = torch.nn.Dropout(0.5)
    with evaluating(model):
        assert not model.training
    assert model.training
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("inside")
    assert model.training
    model.eval()
    with evaluating(model):
        pass
    assert not model.training


def test_a_sampler_that_raises_leaves_the_model_in_training_mode():
    model = PixelSNAIL(PixelSNAILConfig(shape=(3, 3), n_codes=4, n_classes=2, channels=8, n_blocks=1, n_res_blocks=1,
                                        key_channels=4, value_channels=4)).train()
    with pytest.raises(ValueError, match="label"):
        sample_cached(model, 2, label=torch.tensor([0, 5]))
    assert model.training
