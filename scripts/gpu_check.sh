#!/usr/bin/env bash
# The GPU check (make gpu-check), under 8 minutes on one recent GPU, every stage's result in $OUT_DIR:
# 1. the main job end to end through the scripts on CUDA (bench/e2e.py): gpu-e2e.{json,md}, pass/fail per stage;
# 2. the tests that run on CUDA (tests/test_cuda.py);
# 3. the one-GPU benchmark (bench/gpu.py): gpu.{json,md}: training steps/s, sampling samples/s at batch 16, 64, 256
#    and auto, eager against captured, the projected time for 50,000 samples.
# Each part runs even when an earlier one failed; the exit status is that of the first failure.
# PYTHON: the interpreter with the project's dependencies (default .venv/bin/python). On a GPU machine that has
# PyTorch but no package index, install the missing dependencies from wheels first, then run from the repository
# with it: PYTHONPATH=$PWD PYTHON=python3 bash scripts/gpu_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-bench/results}
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: make gpu-check needs CUDA, and torch sees no GPU here")' || exit 1
status=0
failed() { local rc=$?; [ "$status" -ne 0 ] || status=$rc; }  # keeps the first failure's exit status
"$PYTHON" -m bench.e2e --device cuda --out "$OUT_DIR" || failed
"$PYTHON" -m pytest -q tests/test_cuda.py ${PYTEST_ARGS:-} || failed
"$PYTHON" -m bench gpu --out "$OUT_DIR" ${BENCH_ARGS:-} || failed
exit "$status"
