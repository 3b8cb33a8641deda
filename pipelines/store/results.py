"""Evaluation results files: {stage: {name: number}} in one JSON file per pipeline, as
scripts/evaluate.py --json writes them and the report reads them."""

import json
import math
from pathlib import Path

from pipelines.store.outputs import check_output, output_file

EVAL_FILE = "eval.json"  # where a pipeline's (or a run's) results are filed by convention


def check_result_file(path, option="--json"):
    """Refuses, before any work, a results file (given as `option`) that could not be written, or
    that exists but is not a JSON object."""
    if path is None:
        return
    check_output(path, option, (".json",))
    if Path(path).exists():
        read_results(path)


def read_results(path) -> dict:
    """A results file -> {stage: {name: value}}; one that is not that is refused in one line."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable JSON results file ({error})") from None
    if not (isinstance(results, dict) and all(isinstance(numbers, dict) for numbers in results.values())):
        raise ValueError(f"{path} is not a JSON object of stages, each an object of names and numbers "
                         "(as scripts/evaluate.py --json writes it)")
    return results


def read_evaluation(directory) -> dict:
    """DIRECTORY/eval.json, a pipeline's or a run's results, or {} without one."""
    file = Path(directory) / EVAL_FILE
    return read_results(file) if file.is_file() else {}


def write_result(path, stage, result):
    """Files `result` (a flat dict) under `stage` in the JSON file at `path`, keeping the other stages'
    results there; written atomically. Non-finite numbers become null (JSON has no NaN)."""
    results = read_results(path) if Path(path).exists() else {}
    results[stage] = {name: None if isinstance(value, float) and not math.isfinite(value) else value
                      for name, value in result.items()}
    with output_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
