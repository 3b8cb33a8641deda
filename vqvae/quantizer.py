"""Vector quantization with an EMA codebook (van den Oord, Vinyals, Kavukcuoglu 2017, "Neural
Discrete Representation Learning", appendix A.1), as VQ-VAE-2 uses it at both levels.

Each input vector z_e goes to its nearest code e_k (squared Euclidean distance). The codebook is
not trained by gradients: in training mode it follows exponential moving averages of the code
counts N_k and of the sums m_k of the vectors assigned to each code,

    N_k <- decay * N_k + (1 - decay) * n_k          m_k <- decay * m_k + (1 - decay) * sum z_e
    e_k = m_k / N~_k,   N~_k = (N_k + eps) / (N + K * eps) * N   (Laplace smoothing, N = sum N_k)

The encoder is pulled towards its codes by the commitment loss beta * ||z_e - sg(e)||^2, and the
decoder's gradient reaches the encoder straight through the quantization.

Distances, the argmin and the EMA update run in fp32 with autocast disabled, whatever the input
dtype. Under torch.distributed the per-batch counts and sums are all-reduced before the update,
and dead-code restarts draw the same vectors on every process, so every process keeps the same
codebook (DDP's buffer broadcast then changes nothing). In training mode every process must
therefore call forward together; in eval mode there is no communication.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, D, H, W), input dtype, straight-through gradient to the input
    loss: torch.Tensor  # (), fp32: commitment * mse(input, sg(quantized))
    perplexity: torch.Tensor  # (), fp32: exp(entropy of the code frequencies in this batch)
    usage: torch.Tensor  # (), fp32: fraction of the codebook chosen at least once in this batch
    indices: torch.Tensor  # (B, H, W) long


class VectorQuantizerEMA(nn.Module):
    """Nearest-code quantization of channels-first feature maps with an EMA-updated codebook.

    Example, the VQ-VAE-2 bottom level for 256x256 images:
        >>> quantizer = VectorQuantizerEMA(n_codes=512, dim=64)
        >>> out = quantizer(torch.randn(8, 64, 64, 64))
        >>> out.quantized.shape, out.indices.shape          # (8, 64, 64, 64), (8, 64, 64)

    Buffers: `embedding` (K, D) the codes, `cluster_size` (K,) the EMA counts N_k, `embed_sum`
    (K, D) the EMA sums m_k. They change only in training mode. The EMA state starts at zero, so
    the first training step moves every chosen code to the mean of its inputs and restarts the
    others (count 0 < dead_code_threshold) from encoder outputs: a data-dependent initialisation.
    With restarts disabled (threshold 0), codes never chosen keep their initial N(0, 1) vectors.
    Restarts are not in the paper, whose quantizer is this one at dead_code_threshold=0; the
    default of 1 departs from it because it keeps far more of the codebook in use.

    perplexity and usage describe this batch on this process (no communication).
    """

    def __init__(self, n_codes, dim, decay=0.99, eps=1e-5, commitment=0.25, dead_code_threshold=1.0):
        super().__init__()
        if n_codes < 2:
            raise ValueError(f"n_codes must be >= 2, got {n_codes}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if commitment < 0.0:
            raise ValueError(f"commitment must be >= 0, got {commitment}")
        if dead_code_threshold < 0.0:
            raise ValueError(f"dead_code_threshold must be >= 0 (0 disables restarts), got {dead_code_threshold}")
        self.n_codes, self.dim = n_codes, dim
        self.decay, self.eps, self.commitment = decay, eps, commitment
        self.dead_code_threshold = dead_code_threshold
        self.register_buffer("embedding", torch.randn(n_codes, dim))
        self.register_buffer("cluster_size", torch.zeros(n_codes))
        self.register_buffer("embed_sum", torch.zeros(n_codes, dim))

    def extra_repr(self):
        return f"n_codes={self.n_codes}, dim={self.dim}, decay={self.decay}, commitment={self.commitment}"

    @torch.compiler.disable  # data-dependent (bincount, restarts): runs eagerly in a compiled model
    def forward(self, x):
        """(B, D, H, W) -> QuantizerOutput; updates the codebook in training mode."""
        self.check_input(x)
        batch, _, height, width = x.shape
        with torch.autocast(x.device.type, enabled=False):
            inputs = rearrange(x.detach().float(), "b d h w -> (b h w) d")  # (N, D)
            indices = self.nearest(inputs)  # (N,)
            codes = self.embedding[indices]  # (N, D), a copy: taken before the update below
            counts = torch.bincount(indices, minlength=self.n_codes).float()  # (K,)
            if self.training:
                self.update_codebook(inputs, indices, counts)
            codes = rearrange(codes, "(b h w) d -> b d h w", b=batch, h=height, w=width)
            loss = self.commitment * F.mse_loss(x.float(), codes)
            perplexity, usage = batch_statistics(counts)
        quantized = x + (codes.to(x.dtype) - x).detach()
        indices = rearrange(indices, "(b h w) -> b h w", b=batch, h=height, w=width)
        return QuantizerOutput(quantized, loss, perplexity, usage, indices)

    def check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.dim or not x.is_floating_point():
            raise ValueError(f"expected float input of shape (B, {self.dim}, H, W), got {x.dtype} {tuple(x.shape)}")

    @torch.no_grad()
    def nearest(self, inputs):
        """(N, D) fp32 vectors -> (N,) indices of their nearest codes."""
        with torch.autocast(inputs.device.type, enabled=False):
            codes = self.embedding.float()
            # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 is the same for every code
            distances = torch.addmm(codes.pow(2).sum(1), inputs.float(), codes.t(), alpha=-2)  # (N, K)
            return distances.argmin(dim=1)

    @torch.no_grad()
    def codes_of(self, x):
        """(B, D, H, W) -> (B, H, W) indices of the nearest codes; never changes the codebook."""
        self.check_input(x)
        indices = self.nearest(rearrange(x, "b d h w -> (b h w) d"))
        return rearrange(indices, "(b h w) -> b h w", b=x.shape[0], h=x.shape[2], w=x.shape[3])

    def lookup(self, indices):
        """(B, H, W) indices -> (B, D, H, W) fp32 code vectors."""
        return rearrange(self.embedding[indices], "b h w d -> b d h w")

    @torch.no_grad()
    def update_codebook(self, inputs, indices, counts):
        """One EMA step from this batch: (N, D) fp32 inputs, their (N,) codes and the (K,) code
        counts; then the dead-code restarts."""
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, inputs)  # (K, D)
        counts_and_sums = all_reduce_sum(torch.cat([counts[:, None], sums], dim=1))  # (K, 1 + D)
        counts, sums = counts_and_sums[:, 0], counts_and_sums[:, 1:]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.n_codes * self.eps) * total  # (K,)
        # a code never chosen (count exactly 0, sum 0) keeps its vector instead of going to the origin
        chosen = (self.cluster_size > 0)[:, None]  # (K, 1)
        self.embedding.copy_(torch.where(chosen, self.embed_sum / smoothed[:, None], self.embedding))
        if self.dead_code_threshold > 0:
            self.restart_dead_codes(inputs)

    @torch.no_grad()
    def restart_dead_codes(self, inputs):
        """Codes with EMA count < dead_code_threshold become encoder outputs of this batch, with
        EMA state count 1 and sum equal to the new code.

        The dead set is the same on every process (cluster_size is). Each process draws one
        candidate per dead code from its own inputs; dead code j takes the candidate of process
        j mod world_size, so all processes install the same vectors and the restarts draw on the
        data of every process.
        """
        dead = self.cluster_size < self.dead_code_threshold  # (K,)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        candidates = random_rows(inputs, n_dead)  # (n_dead, D)
        world_size = distributed_world_size()
        if world_size > 1:
            gathered = [torch.empty_like(candidates) for _ in range(world_size)]
            dist.all_gather(gathered, candidates)
            gathered = torch.stack(gathered)  # (world_size, n_dead, D)
            slot = torch.arange(n_dead, device=inputs.device)
            candidates = gathered[slot % world_size, slot]
        self.embedding[dead] = candidates
        self.embed_sum[dead] = candidates
        self.cluster_size[dead] = 1.0


def batch_statistics(counts):
    """(K,) code counts (of a batch, or of a whole split) -> (perplexity, fraction of codes used), fp32 scalars."""
    probs = counts / counts.sum()
    entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum()
    return entropy.exp(), (counts > 0).float().mean()


def random_rows(inputs, n):
    """n rows of (N, D) inputs drawn at random, without repeats when N >= n."""
    if len(inputs) >= n:
        rows = torch.randperm(len(inputs), device=inputs.device)[:n]
    else:
        rows = torch.randint(len(inputs), (n,), device=inputs.device)
    return inputs[rows]


def distributed_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor):
    """Sum over processes (in place) when running distributed; the tensor itself otherwise."""
    if distributed_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
