#!/usr/bin/env bash
# The GPU check (make gpu-check): the tests that run on CUDA, then the one-GPU benchmark, whose
# numbers go to bench/results/gpu.{json,md} (or to $1). Under 8 minutes on one recent GPU.
# PYTHON: the interpreter with the project's dependencies (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-bench/results}
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: make gpu-check needs CUDA, and torch sees no GPU here")'
"$PYTHON" -m pytest -q tests/test_cuda.py ${PYTEST_ARGS:-}
"$PYTHON" -m bench gpu --out "$OUT_DIR" ${BENCH_ARGS:-}
