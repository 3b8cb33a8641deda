"""Code databases as training data: the priors' hold-out rule and a batch's model inputs."""

from dataclasses import dataclass
from typing import Callable

from torch.utils.data import Subset

from pipelines.data.holdout import CODE_HELD_OUT_EVERY, is_held_out_record
from pipelines.store.codes import CodeDataset
from pipelines.store.provenance import PriorProvenance


@dataclass
class CodeSplits:
    """A code database as a prior of one level sees it."""

    train_set: Subset
    test_set: Subset
    every_record: CodeDataset  # the whole database: all of it is held out from a prior trained on another
    inputs: Callable  # a batch (top, bottom, label) -> the model's (x, label, cond)
    provenance: PriorProvenance


def code_splits(path, level) -> CodeSplits:
    """The training and held-out records of the code database at `path` for a prior of `level`."""
    dataset = CodeDataset(path)
    every = range(len(dataset))
    test = [i for i in every if is_held_out_record(i)]
    train = [i for i in every if not is_held_out_record(i)]
    if not train:
        raise ValueError(f"{path} holds {len(dataset)} records: too few to hold out every {CODE_HELD_OUT_EVERY}th")
    inputs = code_inputs(level, dataset.metadata["n_classes"] > 1)
    provenance = PriorProvenance.of_database(dataset.metadata, level)
    return CodeSplits(Subset(dataset, train), Subset(dataset, test), dataset, inputs, provenance)


def code_inputs(level, labelled):
    """A batch (top, bottom, label) -> the model's (x, label, cond) for a level."""

    def inputs(batch):
        top, bottom, label = batch
        label = label if labelled else None
        return (top, label, None) if level == "top" else (bottom, label, top)

    return inputs
