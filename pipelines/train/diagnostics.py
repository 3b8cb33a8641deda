"""Warnings a user acts on, from the numbers the training loop logs: overfitting, and a VQ-VAE
codebook falling out of use. Each fires once per run (a resumed run reads the ones it gave from
log.jsonl) and names its numbers; the loop prints it and stores it in its evaluation's log line
under "warnings" (name -> text), where scripts/report.py shows it.

The checks read the periodic evaluations only, each over the same first `eval_batches` test batches
(the test loader does not shuffle); the final evaluation covers the whole split and is not compared.
"""

from dataclasses import dataclass

OVERFIT_EVALUATIONS = 3  # held-out loss rising this many evaluations in a row (while training falls) warns
MIN_CODEBOOK_USAGE = 0.1  # codes in use below this fraction of what the evaluated images could use warns


@dataclass
class Overfitting:
    """The held-out loss rose at each of the last OVERFIT_EVALUATIONS evaluations while the training
    loss (the loop's running average) fell over the same evaluations."""

    train_key: str  # the log's training value, e.g. "train_bits"
    held_out_key: str  # the log's held-out value, e.g. "test_bits"
    name: str  # what the message calls it, e.g. "bits/code"
    kind = "overfitting"

    def check(self, history):
        window = [r for r in history if self.held_out_key in r and self.train_key in r][-OVERFIT_EVALUATIONS - 1:]
        if len(window) <= OVERFIT_EVALUATIONS:
            return None
        held_out, train = [r[self.held_out_key] for r in window], [r[self.train_key] for r in window]
        if not (all(a < b for a, b in zip(held_out, held_out[1:])) and train[-1] < train[0]):
            return None
        best = min(history, key=lambda r: r.get(self.held_out_key, float("inf")))
        return (f"warning: held-out {self.name} rose for {OVERFIT_EVALUATIONS} evaluations ({held_out[0]:.4f} -> "
                f"{held_out[-1]:.4f}, steps {window[0]['step']} -> {window[-1]['step']}) while training fell "
                f"({train[0]:.4f} -> {train[-1]:.4f}): overfitting; the best held-out value was at step "
                f"{best['step']} ({best[self.held_out_key]:.4f}): stop there, or add data, dropout or a smaller model")


@dataclass
class CodebookUsage:
    """A codebook level whose share of codes in use over an evaluation fell below MIN_CODEBOOK_USAGE of
    the share its images can use at all (`attainable`: N code positions use at most N codes)."""

    key: str  # the log's usage value, e.g. "top_usage": share of the codebook the evaluation's images used
    attainable: float  # min(1, code positions evaluated / codebook size)
    name: str  # e.g. "top codebook"

    @property
    def kind(self):
        return self.key

    def check(self, history):
        usage = history[-1].get(self.key)
        if usage is None or usage >= MIN_CODEBOOK_USAGE * self.attainable:
            return None
        return (f"warning: the {self.name} is falling out of use: {usage:.1%} of its codes used at step "
                f"{history[-1]['step']}, below {MIN_CODEBOOK_USAGE:.0%} of the {self.attainable:.1%} the test images "
                "could use: codebook collapse; keep dead-code restarts on (dead_code_threshold > 0), or lower the "
                "learning rate or the codebook size")


def evaluations(log, eval_batches):
    """The periodic evaluations of a run's log records made over `eval_batches` batches, one per step
    (the last logged: a resumed run may have evaluated a step again), in step order."""
    by_step = {r["step"]: r for r in log if not r.get("final") and r.get("eval_batches") == eval_batches}
    return [by_step[step] for step in sorted(by_step)]


def new_warnings(checks, log, record):
    """The warnings (kind -> message) that `record`, this evaluation's log line, raises and that no
    earlier line of `log` (the run's log records) gave."""
    given = {kind for r in log for kind in r.get("warnings", {})}
    history = [r for r in evaluations(log, record["eval_batches"]) if r["step"] < record["step"]] + [record]
    found = {check.kind: check.check(history) for check in checks if check.kind not in given}
    return {kind: message for kind, message in found.items() if message}
