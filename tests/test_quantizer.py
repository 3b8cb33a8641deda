"""The EMA vector quantizer: assignment, straight-through gradients, the EMA update, dead-code
restarts, fp32 under autocast, and identical codebooks across processes."""

import pytest
import torch
import torch.distributed as dist
from accelerate import debug_launcher

from vqvae import VQVAE2, VectorQuantizerEMA, VQVAE2Config


def make_quantizer(n_codes=7, dim=4, seed=0, **options):
    torch.manual_seed(seed)
    return VectorQuantizerEMA(n_codes, dim, **options)


def codebook_state(quantizer):
    """Every buffer of the quantizer in one (K, 2D + 1) tensor."""
    return torch.cat([quantizer.embedding, quantizer.cluster_size[:, None], quantizer.embed_sum], dim=1).clone()


def test_nearest_code_matches_cdist_reference():
    quantizer = make_quantizer().eval()
    x = torch.randn(3, 4, 5, 6)
    out = quantizer(x)
    flat = x.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat.double(), quantizer.embedding.double()).argmin(dim=1).reshape(3, 5, 6)
    assert out.indices.dtype == torch.long and torch.equal(out.indices, expected)
    assert torch.allclose(out.quantized, quantizer.embedding[expected].permute(0, 3, 1, 2), atol=1e-6)
    assert torch.equal(quantizer.codes_of(x), expected)


def test_statistics_of_a_batch():
    quantizer = make_quantizer(n_codes=4, dim=2).eval()
    quantizer.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    x = torch.tensor([[0.1, 0.0], [9.9, 0.1], [0.2, 0.1], [10.0, 0.2]]).T.reshape(1, 2, 2, 2)  # codes 0, 1, 0, 1
    out = quantizer(x)
    assert out.usage.item() == pytest.approx(0.5)
    assert out.perplexity.item() == pytest.approx(2.0)


def test_ema_buffers_change_in_training_only():
    quantizer = make_quantizer()
    x = torch.randn(2, 4, 3, 3)
    before = codebook_state(quantizer)
    quantizer.eval()(x)
    quantizer.codes_of(x)
    assert torch.equal(codebook_state(quantizer), before)
    quantizer.train()(x)
    assert not torch.equal(codebook_state(quantizer), before)


def test_straight_through_gradient_and_commitment_gradient():
    quantizer = make_quantizer(commitment=0.25).eval()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = quantizer(x)
    weights = torch.randn_like(x)
    downstream = (out.quantized * weights).sum()
    grad_quantized, grad_input = torch.autograd.grad(downstream, [out.quantized, x], retain_graph=True)
    assert torch.equal(grad_input, grad_quantized) and torch.equal(grad_input, weights)
    (grad_commitment,) = torch.autograd.grad(out.loss, x)
    codes = quantizer.embedding[out.indices].permute(0, 3, 1, 2)
    assert torch.allclose(grad_commitment, 0.25 * 2 * (x - codes).detach() / x.numel(), atol=1e-7)


def test_ema_update_matches_hand_computed_reference():
    decay, eps = 0.9, 1e-2
    quantizer = make_quantizer(n_codes=5, dim=3, decay=decay, eps=eps, dead_code_threshold=0.0)
    quantizer.cluster_size.copy_(torch.rand(5) * 3)
    quantizer.embed_sum.copy_(torch.randn(5, 3))
    old_sizes, old_sums = quantizer.cluster_size.double(), quantizer.embed_sum.double()
    x = torch.randn(2, 3, 4, 4)
    indices = quantizer.train()(x).indices.flatten()
    vectors = x.permute(0, 2, 3, 1).reshape(-1, 3).double()

    sizes, sums = old_sizes.clone(), old_sums.clone()
    for k in range(5):
        assigned = vectors[indices == k]
        sizes[k] = decay * old_sizes[k] + (1 - decay) * len(assigned)
        sums[k] = decay * old_sums[k] + (1 - decay) * assigned.sum(dim=0)
    total = sizes.sum()
    embedding = torch.stack([sums[k] / ((sizes[k] + eps) / (total + 5 * eps) * total) for k in range(5)])
    assert torch.allclose(quantizer.cluster_size.double(), sizes, atol=1e-6)
    assert torch.allclose(quantizer.embed_sum.double(), sums, atol=1e-6)
    assert torch.allclose(quantizer.embedding.double(), embedding, atol=1e-5)


def far_codes_quantizer(dead_code_threshold):
    """8 codes in 2-D; codes 4..7 sit at (100, 100), where the data never goes."""
    quantizer = make_quantizer(n_codes=8, dim=2, dead_code_threshold=dead_code_threshold)
    quantizer.embedding[4:] = 100.0
    return quantizer


def test_dead_code_restart_revives_unused_codes():
    data = torch.randn(4, 2, 4, 4)
    used_by_far_codes = {}
    for threshold in (0.0, 1e-3):  # restarts off, then on
        quantizer = far_codes_quantizer(threshold)
        assert quantizer.eval()(data).indices.max() < 4
        quantizer.train()(data)  # codes 4..7 have EMA count 0: dead
        used_by_far_codes[threshold] = (quantizer.eval()(data).indices >= 4).any().item()
    assert used_by_far_codes == {0.0: False, 1e-3: True}


def test_restart_resets_the_ema_state_of_the_restarted_codes():
    quantizer = far_codes_quantizer(1e-3)
    data = torch.randn(4, 2, 4, 4)
    quantizer.train()(data)
    vectors = data.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in range(4, 8):
        assert quantizer.cluster_size[k] == 1.0
        assert torch.equal(quantizer.embed_sum[k], quantizer.embedding[k])
        assert (vectors == quantizer.embedding[k]).all(dim=1).any(), "a restarted code is an encoder output"


def test_threshold_zero_is_the_papers_quantizer_no_restart_ever():
    """The paper has no restarts: at dead_code_threshold=0 codes the data never chooses keep
    their initial vectors and a zero EMA state through training; at the default they restart."""
    far_codes = {}
    for threshold in (0.0, VQVAE2Config().dead_code_threshold):
        quantizer = far_codes_quantizer(threshold).train()
        for step in range(20):
            quantizer(torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(step)))
        far_codes[threshold] = codebook_state(quantizer)[4:]
    assert torch.all(far_codes[0.0] == torch.tensor([100.0, 100.0, 0.0, 0.0, 0.0]))
    assert torch.all(far_codes[1.0][:, :2] != 100.0)


def test_the_vqvae_config_passes_the_threshold_to_both_quantizers():
    model = VQVAE2(VQVAE2Config(dead_code_threshold=0.0))
    assert model.quantizer_top.dead_code_threshold == model.quantizer_bottom.dead_code_threshold == 0.0
    assert VQVAE2(VQVAE2Config()).quantizer_top.dead_code_threshold == 1.0


def test_fp32_distances_under_bf16_autocast():
    """1 + 2^-10 rounds to 1 in bf16: in bf16 both codes tie and the argmin picks code 0; in fp32
    the input 1 + 2^-7 is nearer to code 1."""
    quantizer = make_quantizer(n_codes=2, dim=2)
    quantizer.embedding.copy_(torch.tensor([[1.0, 0.0], [1.0 + 2**-10, 0.0]]))
    x = torch.tensor([1.0 + 2**-7, 0.0], dtype=torch.bfloat16).reshape(1, 2, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer.train()(x.requires_grad_(True))
    assert out.indices.item() == 1
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert all(buffer.dtype == torch.float32 for buffer in quantizer.buffers())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(n_codes=1), "n_codes must be >= 2"),
        (dict(dim=0), "dim must be >= 1"),
        (dict(decay=1.0), r"decay must be in \(0, 1\)"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(commitment=-1.0), "commitment must be >= 0"),
        (dict(dead_code_threshold=-1.0), "dead_code_threshold must be >= 0"),
    ],
)
def test_bad_arguments_raise(options, message):
    with pytest.raises(ValueError, match=message):
        VectorQuantizerEMA(**{"n_codes": 4, "dim": 2, **options})


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match=r"shape \(B, 4, H, W\)"):
        make_quantizer()(torch.randn(2, 3, 5, 5))


# -- two processes ------------------------------------------------------------------------------

STEPS = 4
RESTARTS = dict(decay=0.5, dead_code_threshold=0.3)  # restarts at step 1 and again later


def rank_batches(rank):
    """Different data on every rank: (2, 4, 3, 3) batches around 3 * rank."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(2, 4, 3, 3, generator=generator) + 3 * rank for _ in range(STEPS)]


def train_codebook(batches, **options):
    quantizer = make_quantizer(n_codes=16, dim=4, **options).train()
    for batch in batches:
        quantizer(batch)
    return codebook_state(quantizer)


def check_codebooks_across_ranks(pooled_reference, rank0_alone):
    """Runs on each of two processes (gloo on CPU)."""
    torch.set_num_threads(1)
    rank = dist.get_rank()
    batches = rank_batches(rank)
    without_restarts = train_codebook(batches, dead_code_threshold=0.0)
    assert torch.allclose(without_restarts, pooled_reference, atol=1e-5), "EMA differs from one process on both batches"
    with_restarts = train_codebook(batches, **RESTARTS)
    gathered = [torch.empty_like(with_restarts) for _ in range(2)]
    dist.all_gather(gathered, with_restarts)
    assert torch.equal(gathered[0], gathered[1]), "codebooks differ across processes"
    assert not torch.allclose(with_restarts, rank0_alone), "the codebook ignores the other process's data"


def test_identical_codebooks_across_two_processes():
    pooled_batches = [torch.cat(pair) for pair in zip(rank_batches(0), rank_batches(1))]
    pooled_reference = train_codebook(pooled_batches, dead_code_threshold=0.0)
    rank0_alone = train_codebook(rank_batches(0), **RESTARTS)
    debug_launcher(check_codebooks_across_ranks, args=(pooled_reference, rank0_alone), num_processes=2)
