"""A run directory, read side: where a run keeps its state, progress and log, and the readers of
them that evaluation and the report use (the trainers write them: `pipelines.train.run_state`)."""

import json
from pathlib import Path

STATE_DIR = "state"
PROGRESS_FILE = "progress.json"
EMA_FILE = "ema.safetensors"
LOG_FILE = "log.jsonl"
LOCK_FILE = ".lock"
PICKLED_STATE_PATTERNS = ("*.bin", "*.pkl")  # what accelerate's load_state torch.loads (optimizer, RNG, ...)


class StateError(ValueError):
    """A run's state directory that cannot be resumed from: damaged, foreign, or holding code."""


def has_state(run_dir):
    run_dir = Path(run_dir)
    return (run_dir / STATE_DIR).is_dir() or (run_dir / f"{STATE_DIR}.old").is_dir()


def state_dir(run_dir):
    """The state to resume from: RUN_DIR/state, or state.old if a kill landed between renames."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / STATE_DIR, run_dir / f"{STATE_DIR}.old"):
        if (candidate / PROGRESS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no resumable state in {run_dir}")


def read_progress(run_dir):
    """The progress dict of a run's state (step, train and model configs), checked to be one."""
    file = state_dir(run_dir) / PROGRESS_FILE
    try:
        progress = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        progress = None
    if not (isinstance(progress, dict) and {"step", "train_config", "model_config"} <= progress.keys()):
        raise StateError(f"{file} is damaged: expected JSON with step, train_config and model_config")
    return progress


def read_log(run_dir):
    """The records of RUN_DIR/log.jsonl (none if it does not exist); a line that is not a JSON object
    (one cut short by a kill) is skipped."""
    try:
        lines = (Path(run_dir) / LOG_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records
