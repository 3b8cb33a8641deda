"""The inference runtime: device choice, the trainers' precision rule, channels_last, autocast."""

import pytest
import torch

from pipelines.device import make_runtime, resolve_device, resolve_precision
from vqvae import VQVAE2, VQVAE2Config

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_default_device_is_cuda_when_present():
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_where_there_is_none_is_refused():
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available here"):
        resolve_device("cuda")


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
def test_the_precision_follows_the_trainers_rule(precision):
    runtime = make_runtime("cpu", precision)
    assert runtime.precision == resolve_precision(precision, "cpu")
    assert runtime.device.type == "cpu"
    with runtime.autocast():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (torch.bfloat16 if runtime.precision == "bf16" else torch.float32)


def test_images_go_to_the_model_range_in_channels_last():
    runtime = make_runtime("cpu", "fp32")
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).repeat(2, 3, 8, 8)[:, :, :8, :8].contiguous()
    x = runtime.images(images)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, images.float() / 127.5 - 1)


def test_fp32_extraction_in_channels_last_gives_the_codes_of_the_contiguous_model():
    """The fast memory format changes no code: the runtime's VQ-VAE (channels_last weights and
    inputs) against the model as it was loaded."""
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(channels=16, res_channels=8, n_res_blocks=1, top_codes=32, bottom_codes=32,
                                code_dim=8)).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    reference = model.encode(images.float() / 127.5 - 1)
    runtime = make_runtime("cpu", "fp32")
    fast = runtime.vqvae(VQVAE2(model.config)).requires_grad_(False)
    fast.load_state_dict(model.state_dict())
    with runtime.autocast():
        codes = fast.encode(runtime.images(images))
    assert all(torch.equal(a, b) for a, b in zip(codes, reference))


@CUDA
def test_the_runtime_runs_the_vqvae_on_cuda():
    runtime = make_runtime("cuda", "auto")
    model = runtime.vqvae(VQVAE2(VQVAE2Config(channels=16, res_channels=8, n_res_blocks=1, top_codes=8,
                                              bottom_codes=8, code_dim=4)))
    with runtime.autocast():
        top, bottom = model.encode(runtime.images(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)))
    assert top.device.type == "cuda" and top.shape == (2, 2, 2) and bottom.shape == (2, 4, 4)
