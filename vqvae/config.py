"""The VQ-VAE-2 configuration: one dataclass that describes a model completely.

The defaults are the settings of Razavi, van den Oord and Vinyals 2019 ("Generating Diverse
High-Fidelity Images with VQ-VAE-2") for ImageNet 256, except for dead-code restarts
(`dead_code_threshold`; the paper has none, 0 turns them off): two levels (the bottom grid a
quarter of the image side, the top one an eighth), codebooks of 512 codes x 64 dimensions, EMA
codebook updates (decay 0.99, eps 1e-5), commitment cost 0.25, 128 hidden channels and residual
stacks of 2 blocks with 64 channels. The paper's FFHQ 1024 model has three levels and a bottom
grid an eighth of the image side (`levels=3, bottom_stride=8`, vqvae/presets.py).

    >>> config = VQVAE2Config()                      # the paper's ImageNet 256 model
    >>> config.top_codes, config.bottom_codes, config.code_dim
    (512, 512, 64)
    >>> VQVAE2Config(levels=3, middle_codes=256).codebook_sizes()
    (512, 256, 512)
    >>> VQVAE2Config.from_json(config.to_json()) == config
    True
"""

from dataclasses import dataclass

from modelkit import JSONConfig, level_names


@dataclass
class VQVAE2Config(JSONConfig):
    # levels of codes, each grid half the side of the one below; configs written before the field
    # existed describe two-level models, its default
    levels: int = 2
    bottom_stride: int = 4  # image side / bottom grid side: a power of two >= 4
    top_codes: int = 512  # codebook size of the top level
    middle_codes: int = 512  # codebook size of every level between the top and the bottom (levels >= 3)
    bottom_codes: int = 512  # codebook size of the bottom level
    code_dim: int = 64  # dimension of every code vector, every level
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
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")
        if self.bottom_stride < 4 or self.bottom_stride & (self.bottom_stride - 1):
            raise ValueError(f"bottom_stride must be a power of two >= 4, got {self.bottom_stride}")
        for name in ("top_codes", "middle_codes", "bottom_codes"):
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

    @property
    def level_names(self) -> tuple[str, ...]:
        """The levels' names, top first: ("top", "bottom") for two levels."""
        return level_names(self.levels)

    def codebook_sizes(self) -> tuple[int, ...]:
        """The codebook size of each level, top first."""
        return (self.top_codes, *[self.middle_codes] * (self.levels - 2), self.bottom_codes)

    def strides(self) -> tuple[int, ...]:
        """Image side / grid side of each level, top first: (8, 4) for the default two levels."""
        return tuple(self.bottom_stride * 2 ** (self.levels - 1 - k) for k in range(self.levels))
