"""Input checks the models share."""

import torch


def check_range(name, values, upper):
    """Raises ValueError unless every integer in `values` lies in [0, upper). Skipped inside
    torch.compile, where a data-dependent branch would split the graph: the trainers' code
    databases check every record as they read it."""
    if torch.compiler.is_compiling():
        return
    if values.numel() and (values.min() < 0 or values.max() >= upper):
        raise ValueError(f"{name} must lie in [0, {upper}), got values in [{values.min()}, {values.max()}]")
