"""The names of a hierarchy's levels, top first: what the VQ-VAE calls its modules, the code
database its records' grids and the trainers their logged figures.

Two levels keep the names VQ-VAE-2 gives them (top, bottom), three add the middle one of the
paper's FFHQ model; deeper hierarchies number their levels from the top, as the command lines do
(`level0` is the top).

    >>> level_names(2), level_names(3)
    (('top', 'bottom'), ('top', 'middle', 'bottom'))
    >>> level_names(4)
    ('level0', 'level1', 'level2', 'level3')
"""

NAMED = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
MIN_LEVELS = 2


def level_names(n_levels: int) -> tuple[str, ...]:
    """The names of `n_levels` levels, top first."""
    if n_levels < MIN_LEVELS:
        raise ValueError(f"a hierarchy has at least {MIN_LEVELS} levels, got {n_levels}")
    return NAMED.get(n_levels, tuple(f"level{k}" for k in range(n_levels)))
