# Quick start: `make demo` (the main job on built-in data) and `make test` (the test suite).
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-pixels test bench gpu-check gpu-wheels clean

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

# for a GPU machine with PyTorch but no package index: wheels of what its interpreter lacks (gpu_check.sh names
# them) into .whl/, which scripts/gpu_check.sh installs there; the default is what an NVIDIA PyTorch image lacked
GPU_WHEELS ?= lmdb constriction
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON_VERSION) --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs
