"""scripts/evaluate.py's stages beyond pixel bits/dim (prior, vqvae, samples) on a tiny_pipeline pipeline, and
the sample metrics themselves: CAS, local FID / KID, the refusals of Inception weights."""

import json
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from launch import ok
from pipelines.data.datasets import builtin_split_photos, load_dataset, to_model_range
from pipelines.eval.classifier import ClassifierConfig, train_classifier
from pipelines.eval.report import write_report
from pipelines.eval.sample_metrics import (LabelledImages, evaluate_samples, inception_fid_metric, load_samples,
                                           local_fid_kid, real_images)
from pipelines.infer.extract import extract_with_vqvae
from pipelines.store.checkpoint import load_pixelsnail, load_vqvae
from pipelines.store.codes import CodeDataset
from test_inputs import assert_refused, script  # noqa: F401 (script: a fixture)

NUMBER = r"-?\d+\.\d+"


@pytest.fixture
def tiny(tiny_pipeline):
    """The tiny pipeline's directory (conftest.py): images/, vqvae/, codes.lmdb, top/, bottom/."""
    return tiny_pipeline


def evaluate(*args):
    return ok("scripts/evaluate.py", *map(str, args), in_process=True).strip().splitlines()


def test_prior_bits_per_code_held_out_and_train(tiny, tmp_path):
    lines = evaluate("prior", "--ckpt", tiny / "bottom", "--codes", tiny / "codes.lmdb", "--json",
                     tmp_path / "prior.json")
    assert re.fullmatch(rf"held-out bits/code: ({NUMBER}) \(train ({NUMBER}), gap ([+-]\d+\.\d+)\)", lines[-1])
    result = json.loads((tmp_path / "prior.json").read_text())["bottom_prior"]
    # by hand: every 20th record is held out, as the trainer holds them out
    records = CodeDataset(tiny / "codes.lmdb")
    held_out = [records[i] for i in range(0, len(records), 20)]
    top, bottom, label = (torch.stack([record[k] for record in held_out]) for k in range(3))
    model, _ = load_pixelsnail(tiny / "bottom")
    with torch.no_grad():
        expected = model.nll(bottom, label, top).double().mean().item()
    assert result["heldout_bits_per_code"] == pytest.approx(expected, abs=1e-5)
    assert result["gap_bits_per_code"] == pytest.approx(result["heldout_bits_per_code"] - result["train_bits_per_code"])
    assert (result["heldout_records"], result["train_records"]) == (len(held_out), len(records) - len(held_out))
    assert result["database"] == str(tiny / "codes.lmdb") and result["trained_on_database"] is True


@pytest.fixture(scope="module")
def other_database(tiny_pipeline, tmp_path_factory):
    """Another code database of the tiny pipeline's VQ-VAE: its images' test split (16 records)."""
    path = tmp_path_factory.mktemp("other") / "test.lmdb"
    extract_with_vqvae(tiny_pipeline / "vqvae", str(tiny_pipeline / "images"), path, split="test", n_classes=2)
    return path


def test_prior_on_another_database_of_its_vqvae_holds_out_every_record(tiny, other_database, tmp_path):
    """Its records were once called training records, with a train figure and a gap, filed as the
    run's own in --json and shown so by the report."""
    run = shutil.copytree(tiny / "top", tmp_path / "top")
    lines = evaluate("prior", "--ckpt", run, "--codes", other_database, "--json", run / "eval.json")
    assert re.fullmatch(rf"held-out bits/code: ({NUMBER}) \(another database: no train figure\)", lines[-1])
    assert f"on {other_database}, not the code database it trained on: all its 16 records are held out" in lines[-2]
    result = json.loads((run / "eval.json").read_text())["top_prior"]
    assert "train_bits_per_code" not in result and "gap_bits_per_code" not in result and "train_records" not in result
    assert (result["database"], result["trained_on_database"], result["heldout_records"]) == (str(other_database),
                                                                                            False, 16)
    records = CodeDataset(other_database)
    top, _, label = (torch.stack([records[i][k] for i in range(len(records))]) for k in range(3))
    model, _ = load_pixelsnail(run)
    with torch.no_grad():
        expected = model.nll(top, label).double().mean().item()
    assert result["heldout_bits_per_code"] == pytest.approx(expected, abs=1e-5)
    page = write_report([run], tmp_path / "report.html").read_text()
    assert f"on {other_database}, not the code database it trained on: every record is held out" in page
    assert "train_bits_per_code" not in page


def test_prior_on_a_copy_of_its_own_database_keeps_its_split(tiny, tmp_path):
    """The database's identity, not its path, tells: a moved copy is still the prior's own."""
    copy = shutil.copytree(tiny / "codes.lmdb", tmp_path / "moved.lmdb")
    run = shutil.copytree(tiny / "top", tmp_path / "top")
    lines = evaluate("prior", "--ckpt", run, "--codes", copy, "--json", run / "eval.json")
    assert re.fullmatch(rf"held-out bits/code: {NUMBER} \(train {NUMBER}, gap [+-]\d+\.\d+\)", lines[-1])
    result = json.loads((run / "eval.json").read_text())["top_prior"]
    assert (result["database"], result["trained_on_database"]) == (str(copy), True)
    page = write_report([run], tmp_path / "report.html").read_text()
    assert f"on {copy}, the code database it trained on" in page and "train_bits_per_code" in page


def test_vqvae_and_samples_numbers_in_one_json_for_all_stages(tiny, tmp_path):
    report = tmp_path / "eval.json"
    lines = evaluate("vqvae", "--ckpt", tiny / "vqvae", "--data", tiny / "images", "--json", report)
    assert re.fullmatch(rf"test reconstruction mse: ({NUMBER}) \(PSNR ({NUMBER}) dB, SSIM ({NUMBER})\)", lines[-1])
    assert re.fullmatch(rf"top codes: {NUMBER}% of 8 used, perplexity {NUMBER}", lines[-4])
    lines = evaluate("samples", "--vqvae", tiny / "vqvae", "--top", tiny / "top",
                     "--bottom", tiny / "bottom", "--data", tiny / "images", "--per-class", 4,
                     "--classifier-steps", 10, "--json", report)
    assert re.fullmatch(rf"CAS: ({NUMBER}) \(real-data ceiling ({NUMBER})\)", lines[-1])
    assert re.fullmatch(rf"local FID \(classifier features\): {NUMBER} \(real training images: {NUMBER}\)", lines[-4])
    assert re.fullmatch(rf"local KID \(classifier features\): {NUMBER} \(real training images: {NUMBER}\)", lines[-3])
    assert lines[-2].startswith("Inception FID: not computed (give --inception-weights FILE")
    assert "pt_inception-2015-12-05" in lines[-2]
    results = json.loads(report.read_text())
    assert set(results) == {"vqvae", "samples"}
    check_vqvae_numbers(tiny, results["vqvae"])
    samples = results["samples"]
    assert (samples["samples"], samples["classes"], samples["real_heldout"]) == (8, 2, 8)
    for key in ("cas", "cas_real_ceiling", "local_fid_samples", "local_fid_real", "local_kid_samples", "seconds"):
        assert isinstance(samples[key], float), key


def check_vqvae_numbers(tiny, result):
    """The VQ-VAE's figures against a computation by hand over the test split."""
    model, _ = load_vqvae(tiny / "vqvae")
    images = torch.stack([image for image, _ in load_dataset(str(tiny / "images"), "test", 16)])
    x = to_model_range(images)
    top, bottom = model.encode(x)
    mse = (model.decode_codes(top, bottom) - x).square().mean().item()
    assert result["mse"] == pytest.approx(mse, rel=1e-5)
    assert result["psnr_db"] == pytest.approx(10 * np.log10(4 / mse), rel=1e-4)
    assert 0 < result["ssim"] <= 1 and result["images"] == len(images)
    for level, codes in (("top", top), ("bottom", bottom)):
        assert result[f"{level}_usage"] == pytest.approx(len(codes.unique()) / 8)
        assert 1 <= result[f"{level}_perplexity"] <= len(codes.unique()) + 1e-4


def test_samples_refuse_missing_inception_weights_saying_where_to_get_them(tiny, script, tmp_path):
    result = script("evaluate.py", "samples", "--samples", tiny / "none.npz", "--data", tiny / "images",
                    "--inception-weights", tmp_path / "nowhere.pth", "--json", tmp_path / "refused.json")
    assert_refused(result, "--inception-weights", "pt_inception-2015-12-05-6726825d.pth", "nothing is downloaded")
    assert not (tmp_path / "refused.json").exists()


def test_samples_are_read_from_a_sample_directory_and_unconditional_ones_refused(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    codes = dict(top_codes=np.zeros((6, 2, 2), np.uint16), bottom_codes=np.zeros((6, 4, 4), np.uint16))
    np.savez(tmp_path / "samples.npz", images=images, labels=np.array([0, 0, 1, 1, 2, 2]), **codes)
    samples = load_samples(tmp_path)
    assert torch.equal(samples.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert samples.labels.tolist() == [0, 0, 1, 1, 2, 2]
    np.savez(tmp_path / "unconditional.npz", images=images, labels=np.full(6, -1), **codes)
    with pytest.raises(ValueError, match="unconditional samples"):
        load_samples(tmp_path / "unconditional.npz")


class Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_inception_weights_are_never_unpickled_and_must_be_the_fid_network(tmp_path):
    pickled = tmp_path / "code.pth"
    pickled.write_bytes(pickle.dumps({"fc.weight": Payload()}, protocol=2))
    with pytest.raises(ValueError, match="not a weights-only torch file"):
        inception_fid_metric(pickled)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, other)
    with pytest.raises(ValueError, match="not the FID Inception network"):
        inception_fid_metric(other)


def test_stages_refuse_bad_arguments(tiny, script, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1, 2]")
    cases = [
        (["samples", "--data", tiny / "images"], "give either --vqvae, --top and --bottom"),
        (["samples", "--vqvae", tiny / "vqvae", "--data", tiny / "images"], "give either"),
        (["samples", "--samples", tiny / "codes.lmdb", "--data", tiny / "images"], "samples not found"),
        (["prior", "--ckpt", tiny / "top", "--codes", tiny / "codes.lmdb", "--max-records", 0], "--max-records"),
        (["prior", "--ckpt", tiny / "vqvae", "--codes", tiny / "codes.lmdb"], "expected 'pixelsnail'"),
        (["vqvae", "--ckpt", tiny / "top", "--data", tiny / "images"], "expected 'vqvae2'"),
        (["vqvae", "--ckpt", tiny / "vqvae", "--data", tiny / "images", "--json", bad_json],
         "not a JSON object"),
    ]
    for args, message in cases:
        assert_refused(script("evaluate.py", *args), message)


# -- the metrics themselves ---------------------------------------------------------------------------


def coloured(n, seed, noise_only=False):
    """n uint8 images (n, 3, 16, 16) of 3 classes: class k has its channel k brighter; or uniform noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    if noise_only:
        return LabelledImages(torch.randint(0, 256, (n, 3, 16, 16), generator=generator, dtype=torch.uint8), labels)
    images = torch.rand(n, 3, 16, 16, generator=generator) * 160
    images[torch.arange(n), labels] += 90
    return LabelledImages(images.to(torch.uint8), labels)


@pytest.fixture(scope="module")
def real_classifier(one_thread):
    real = coloured(90, seed=0)
    return train_classifier(real.images, real.labels, ClassifierConfig(n_classes=3, image_size=16, widths=(8, 16)),
                            steps=40, batch_size=32)


def test_local_fid_is_zero_for_a_set_against_itself_and_fid_kid_large_against_noise(real_classifier):
    real, noise = coloured(240, seed=1), coloured(240, seed=2, noise_only=True)
    fid_self, _, _ = local_fid_kid(real_classifier, real, real)
    fid_fresh, kid_fresh, _ = local_fid_kid(real_classifier, real, coloured(240, seed=3))  # the same distribution
    fid_noise, kid_noise, _ = local_fid_kid(real_classifier, real, noise)
    assert abs(fid_self) < 1e-6
    assert fid_noise > 10 * fid_fresh and kid_noise > 10 * abs(kid_fresh)


def test_cas_is_high_for_faithful_samples_and_chance_for_samples_of_the_wrong_class():
    real_train, real_other, real_test = coloured(60, seed=4), coloured(60, seed=5), coloured(60, seed=6)
    faithful = coloured(60, seed=7)
    wrong = LabelledImages(faithful.images, (faithful.labels + 1) % 3)
    good = evaluate_samples(faithful, real_train, real_other, real_test, 3, steps=40)
    bad = evaluate_samples(wrong, real_train, real_other, real_test, 3, steps=40)
    assert good["cas"] > 0.9 and good["cas_real_ceiling"] > 0.9
    assert bad["cas"] < 0.1  # it learned the shifted classes: wrong on nearly every real image
    assert good["local_fid_samples"] == pytest.approx(bad["local_fid_samples"])  # FID ignores labels


def test_builtin_real_sets_hold_the_training_photos_classes_apart(one_thread):
    n_classes = len(builtin_split_photos("train"))
    first, second, held_out = real_images("builtin", 16, n_classes=n_classes, n=3)
    for images in (first, second, held_out):
        assert len(images) == 3 * n_classes and sorted(images.labels.tolist()) == sorted(list(range(n_classes)) * 3)
    assert not any(torch.equal(a, b) for a in first.images for b in second.images)


def test_without_a_stage_evaluate_evaluates_what_the_checkpoint_holds(tiny):
    """--ckpt alone: a VQ-VAE is evaluated as a VQ-VAE and a prior as a prior, as their checkpoints
    record, with the same last line as the stage named."""
    for stage, ckpt, extra in (("vqvae", tiny / "vqvae", ["--data", tiny / "images"]),
                               ("prior", tiny / "top", ["--codes", tiny / "codes.lmdb"])):
        named = evaluate(stage, "--ckpt", ckpt, *extra)[-1]
        assert evaluate("--ckpt", ckpt, *extra)[-1] == named
