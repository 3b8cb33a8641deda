"""A module's mode, switched for a while."""

from contextlib import contextmanager


@contextmanager
def evaluating(model):
    """`model` in eval mode (no dropout) inside the block; its previous mode is restored however
    the block ends, also when it raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
