"""Code databases as training data: the priors' hold-out rule and a batch's model inputs."""

from dataclasses import dataclass
from typing import Callable

from torch.utils.data import Subset

from modelkit import level_names
from pipelines.data.holdout import CODE_HELD_OUT_EVERY, is_held_out_record
from pipelines.store.codes import CodeDataset, layout_levels
from pipelines.store.provenance import PriorProvenance


@dataclass
class CodeSplits:
    """A code database as a prior of one level sees it."""

    train_set: Subset
    test_set: Subset
    every_record: CodeDataset  # the whole database: all of it is held out from a prior trained on another
    inputs: Callable  # a batch (one grid per level, top first, then label) -> the model's (x, label, cond)
    provenance: PriorProvenance


def code_splits(path, level) -> CodeSplits:
    """The training and held-out records of the code database at `path` for a prior of `level` (a
    level name or index, see `database_level`)."""
    dataset = CodeDataset(path)
    level = database_level(level, layout_levels(dataset.metadata), path)
    every = range(len(dataset))
    test = [i for i in every if is_held_out_record(i)]
    train = [i for i in every if not is_held_out_record(i)]
    if not train:
        raise ValueError(f"{path} holds {len(dataset)} records: too few to hold out every {CODE_HELD_OUT_EVERY}th")
    inputs = code_inputs(level, dataset.metadata["n_classes"] > 1)
    provenance = PriorProvenance.of_database(dataset.metadata, level)
    return CodeSplits(Subset(dataset, train), Subset(dataset, test), dataset, inputs, provenance)


def database_level(level: str, levels: int, path) -> str:
    """The name of `level` in a database of `levels` levels: a name (top, middle, bottom for three;
    level0 ... for four or more) or an index, 0 (top) to levels - 1 (bottom). ValueError naming
    --level and `path` where the database has no such level."""
    names = level_names(levels)
    if level.isdigit() and int(level) < levels:
        return names[int(level)]
    if level not in names:
        raise ValueError(f"--level {level}: {path} holds {levels} levels of codes ({', '.join(names)}); "
                         f"give one of them or an index 0 (top) to {levels - 1} (bottom)")
    return level


def code_inputs(level, labelled):
    """A batch (one grid per level, top first, then the label: (top, bottom, label) for two levels)
    -> the model's (x, label, cond) for a level: its grid, conditioned on the grid of the level above."""

    def inputs(batch):
        *grids, label = batch
        k = level_names(len(grids)).index(level)
        return grids[k], label if labelled else None, grids[k - 1] if k > 0 else None

    return inputs
