"""The small classifier of the sample metrics: it learns, repeats with its seed, and round-trips its checkpoint."""

import pytest
import torch

from pipelines.eval.classifier import Classifier, ClassifierConfig, load_classifier, save_classifier, train_classifier
from pipelines.store.checkpoint import CheckpointError

TINY = dict(image_size=16, widths=(8, 16))


def coloured_images(n, seed):
    """n uint8 images (n, 3, 16, 16) of 3 classes: class k has its channel k brighter, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.rand(n, 3, 16, 16, generator=generator) * 160
    images[torch.arange(n), labels] += 90
    return images.to(torch.uint8), labels


@pytest.fixture(scope="module")
def trained(one_thread):
    images, labels = coloured_images(96, seed=0)
    config = ClassifierConfig(n_classes=3, **TINY)
    return train_classifier(images, labels, config, steps=40, batch_size=32, seed=0), images, labels


def test_it_learns_classes_it_can_tell_apart(trained):
    model, _, _ = trained
    images, labels = coloured_images(60, seed=1)  # unseen images
    assert (model.predict(images) == labels).float().mean() > 0.9


def test_the_seed_decides_the_model_and_the_global_rng_is_untouched(trained):
    model, images, labels = trained
    state = torch.random.get_rng_state()
    again = train_classifier(images, labels, model.config, steps=40, batch_size=32, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    other = train_classifier(images, labels, model.config, steps=40, batch_size=32, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(model.head.weight, other.head.weight)


def test_features_are_the_penultimate_layer(trained):
    model, images, _ = trained
    features = model.features(images)
    assert features.shape == (len(images), TINY["widths"][-1]) and features.dtype == torch.float32
    logits = model.head(features)
    assert torch.equal(logits.argmax(dim=1), model.predict(images))


def test_the_checkpoint_round_trips(trained, tmp_path):
    model, images, _ = trained
    save_classifier(model, tmp_path / "classifier.safetensors", trained_on="colours")
    loaded, extra = load_classifier(tmp_path / "classifier.safetensors")
    assert loaded.config == model.config and extra == {"trained_on": "colours"}
    assert torch.equal(loaded.features(images), model.features(images))


def test_another_kind_of_checkpoint_is_refused(tmp_path):
    from pipelines.store.checkpoint import save_checkpoint
    from vqvae import VQVAE2, VQVAE2Config

    config = VQVAE2Config(top_codes=4, bottom_codes=4, code_dim=2, channels=4, res_channels=2, n_res_blocks=1)
    save_checkpoint(tmp_path / "vqvae.safetensors", VQVAE2(config).state_dict(), "vqvae2", config)
    with pytest.raises(CheckpointError, match="expected 'classifier'"):
        load_classifier(tmp_path / "vqvae.safetensors")


def test_a_64_pixel_classifier_takes_a_strided_first_conv():
    model = Classifier(ClassifierConfig(n_classes=2, image_size=64))
    assert model.stages[0][0].stride == (2, 2)
    assert model.features(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 64)


@pytest.mark.parametrize("images, labels, message", [
    (torch.zeros(4, 3, 16, 16), torch.zeros(4), "expected uint8 images"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4), r"\(N, 3, 16, 16\)"),
    (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.zeros(3), "expected 4 labels"),
    (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.tensor([0, 1, 2, 3]), r"labels must lie in \[0, 3\)"),
])
def test_bad_inputs_are_refused(images, labels, message):
    with pytest.raises(ValueError, match=message):
        train_classifier(images, labels, ClassifierConfig(n_classes=3, **TINY), steps=1)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="n_classes"):
        ClassifierConfig(n_classes=1)
    with pytest.raises(ValueError, match="too small"):
        ClassifierConfig(n_classes=2, image_size=4, widths=(4, 4, 4, 4))
