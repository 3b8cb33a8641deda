#!/usr/bin/env bash
# The GPU check (make gpu-check), under 8 minutes on one recent GPU, every stage's result in $OUT_DIR:
# 1. the main job end to end through the scripts on CUDA (bench/e2e.py): gpu-e2e.{json,md}, pass/fail per stage;
# 2. the tests that run on CUDA (tests/test_cuda.py);
# 3. the one-GPU benchmark (bench/gpu.py): gpu.{json,md}: training steps/s, sampling samples/s at batch 16, 64, 256
#    and auto, eager against captured, the projected time for 50,000 samples.
# Each part runs even when an earlier one failed; the exit status is that of the first failure.
# PYTHON: the interpreter with the project's dependencies (default .venv/bin/python). On a GPU machine that has
# PyTorch but no package index: `make gpu-wheels` on a machine that has one, copy the repository with its .whl/
# folder over, then `PYTHON=python3 bash scripts/gpu_check.sh OUT_DIR`: the wheels are installed into .whl/site.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-bench/results}
export PYTHONPATH="$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repository runs uninstalled too
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target .whl/site .whl/*.whl || exit 1
fi
"$PYTHON" - <<'PY' || exit 1
# one line naming every missing or too old dependency (pyproject.toml's, and pytest), before anything runs
import importlib.metadata, re, sys, tomllib
with open("pyproject.toml", "rb") as file:
    wanted = tomllib.load(file)["project"]["dependencies"] + ["pytest>=8"]
try:  # versions are checked where packaging (or pip's copy) is at hand, names alone elsewhere
    from packaging.requirements import Requirement
except ImportError:
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        Requirement = None
def name(line):
    return re.match(r"[A-Za-z0-9._-]+", line)[0]
def unmet(line):
    try:
        version = importlib.metadata.version(name(line))
    except importlib.metadata.PackageNotFoundError:
        return True
    # a vendor's build is often a pre-release (NVIDIA's PyTorch 2.11.0a0+...): it counts
    return Requirement is not None and not Requirement(line).specifier.contains(version, prereleases=True)
if missing := [line for line in wanted if unmet(line)]:
    sys.exit(f"error: this interpreter lacks {', '.join(missing)}: install them, or run `make gpu-wheels "
             f"GPU_WHEELS='{' '.join(map(name, missing))}'` where there is a package index and copy .whl/ here")
PY
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: make gpu-check needs CUDA, and torch sees no GPU here")' || exit 1
status=0
failed() { local rc=$?; [ "$status" -ne 0 ] || status=$rc; }  # keeps the first failure's exit status
"$PYTHON" -m bench.e2e --device cuda --out "$OUT_DIR" || failed
"$PYTHON" -m pytest -q tests/test_cuda.py ${PYTEST_ARGS:-} || failed
"$PYTHON" -m bench gpu --out "$OUT_DIR" ${BENCH_ARGS:-} || failed
exit "$status"
