"""The training diagnostics on made-up metric sequences, and once in a tiny VQ-VAE run."""

import pytest

from pipelines.store import run_files
from pipelines.train import diagnostics
from pipelines.train.diagnostics import CodebookUsage, Overfitting, new_warnings
from pipelines.train.vqvae import VQVAETrainConfig, train

OVERFIT = Overfitting("train_bits", "test_bits", "bits/code")


def records(train, held_out, eval_batches=5):
    return [{"step": 100 * (k + 1), "train_bits": t, "test_bits": h, "eval_batches": eval_batches}
            for k, (t, h) in enumerate(zip(train, held_out))]


def warn(log):
    """What the last record of `log` raises, given the ones before it."""
    return new_warnings([OVERFIT], log[:-1], log[-1])


def test_held_out_rising_while_training_falls_warns_with_its_numbers():
    log = records([3.6, 3.4, 3.3, 3.25, 3.2], [3.65, 3.61, 3.64, 3.67, 3.70])
    assert warn(log[:4]) == {}  # rose twice only
    message = warn(log)["overfitting"]
    assert message.startswith("warning: held-out bits/code rose for 3 evaluations (3.6100 -> 3.7000")
    assert "steps 200 -> 500" in message and "training fell (3.4000 -> 3.2000)" in message
    assert "best held-out value was at step 200 (3.6100)" in message


@pytest.mark.parametrize("train, held_out", [
    ([3.4, 3.3, 3.25, 3.2], [3.61, 3.64, 3.63, 3.70]),  # the held-out loss fell once in between
    ([3.2, 3.3, 3.35, 3.4], [3.61, 3.64, 3.67, 3.70]),  # both rise: training diverges, not overfitting
    ([3.4, 3.3, 3.25, 3.2], [3.61, 3.61, 3.67, 3.70]),  # a flat step is not a rise
])
def test_no_warning_unless_held_out_rises_every_time_while_training_falls(train, held_out):
    assert warn(records(train, held_out)) == {}


def test_warns_once_per_run():
    log = records([3.4, 3.3, 3.25, 3.2, 3.1], [3.61, 3.64, 3.67, 3.70, 3.80])
    first = warn(log[:4])
    assert set(first) == {"overfitting"}
    log[3]["warnings"] = first
    assert warn(log) == {}  # given before (a resumed run reads it from log.jsonl)


def test_compares_periodic_evaluations_over_the_same_batches_one_per_step():
    log = records([3.4, 3.3, 3.25, 3.2], [3.61, 3.64, 3.67, 3.70])
    assert set(warn(log)) == {"overfitting"}
    # the final evaluation (whole split) and evaluations over another number of batches are not compared
    assert warn(log[:1] + [{**log[1], "final": True}, {**log[2], "eval_batches": 7}] + log[3:]) == {}
    # a step evaluated again after a resume counts once, with its last value
    assert set(warn(log[:2] + [{**log[2], "test_bits": 3.50}] + log[2:])) == {"overfitting"}


def test_codebook_usage_below_its_share_of_what_a_batch_can_use_warns():
    check = CodebookUsage("top_usage", attainable=0.5, name="top codebook")
    low = {"step": 300, "eval_batches": 5, "top_usage": 0.04}
    message = new_warnings([check], [], low)["top_usage"]
    assert message.startswith("warning: the top codebook is falling out of use: 4.0% of its codes used at step 300")
    assert "10% of the 50.0% the test images could use" in message
    assert new_warnings([check], [], {**low, "top_usage": 0.06}) == {}  # 0.06 >= 0.1 * 0.5


def test_a_tiny_run_warns_once_on_the_console_and_in_its_log(image_folder, tmp_path, monkeypatch, capsys, one_thread):
    """Every usage is below 200% of what a batch can use: each level warns at the first evaluation,
    and never again, in this session or after a resume."""
    monkeypatch.setattr(diagnostics, "MIN_CODEBOOK_USAGE", 2.0)
    config = dict(data=str(image_folder), out=str(tmp_path / "run"), preset="cpu-small", size=8, batch_size=4,
                  precision="fp32", eval_every=1, eval_batches=1, checkpoint_every=2, n_images=0)
    train(VQVAETrainConfig(steps=3, **config))
    train(VQVAETrainConfig(steps=5, resume=True, **config))
    console = capsys.readouterr().out
    assert console.count("warning: the top codebook is falling out of use") == 1
    assert console.count("warning: the bottom codebook is falling out of use") == 1
    warned = [r for r in run_files.read_log(tmp_path / "run") if "warnings" in r]
    assert [(r["step"], sorted(r["warnings"])) for r in warned] == [(1, ["bottom_usage", "top_usage"])]
    assert warned[0]["warnings"]["top_usage"] in console


def test_the_log_is_read_past_a_line_cut_short(tmp_path):
    """A kill while appending leaves half a line: the records around it are still read."""
    (tmp_path / "log.jsonl").write_text('{"step": 1, "test_bits": 3.6}\n{"step": 2, "te\n[1]\n{"step": 3}\n')
    assert run_files.read_log(tmp_path) == [{"step": 1, "test_bits": 3.6}, {"step": 3}]
    assert run_files.read_log(tmp_path / "none") == []
