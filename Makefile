# Quick start: `make demo` (the main job on built-in data) and `make test` (the test suite).
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-pixels test bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

demo-pixels: $(VENV)/.installed
	$(PY) scripts/demo_pixels.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m bench train

# on a machine with a CUDA GPU: the CUDA tests, then bench/results/gpu.md (under 8 minutes)
gpu-check: $(VENV)/.installed
	PYTHON=$(PY) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
