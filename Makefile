# One entry point for set-up, the demo (the README's main job) and the tests (what CI runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# torch 2.13.0: the CPU wheel this project's machines carry (any other spec may pull CUDA).
TORCH ?= torch==2.13.0
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: setup setup-demo demo test test-fast lint format bench clean

# Two installs: the demo's (the package, its default backend TensorFlow, and PyTorch to read the
# official .pth files) and, on top of it, everything the tests, exports and notebooks use.
setup-demo: $(VENV)/.installed-demo
setup: $(VENV)/.installed

$(VENV)/.installed-demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[torch]"
	touch $@

$(VENV)/.installed: $(VENV)/.installed-demo
	$(PY) -m pip install -q "$(TORCH)" -e ".[torch,jax,export,keras-hub,test]"
	touch $@

# The README's main job: classify the sample photos with the official ConvNeXt-T.
demo: setup-demo
	$(BIN)/convnext predict examples/images/*.jpg --model convnext_tiny_1k_224 --top 3

# ruff for style; import-linter for the architecture (the layers, no cycles, what importing a
# module may load: pyproject.toml [tool.importlinter], ARCHITECTURE.md).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=tools $(BIN)/lint-imports --no-cache

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Everything CI runs: lint, the whole suite on TensorFlow (the default backend), then the
# backend-sensitive tests (marker `backends`, and the PyTorch-equality proofs) on JAX and on
# Keras' PyTorch backend. Tests marked `slow` (the large/xlarge equality proofs: the same code
# as base, 1-1.5 minutes each; small/base with the 21841-class head) run on TensorFlow only.
test: lint
	KERAS_BACKEND=tensorflow $(PYTEST) -n 2 --durations=15
	KERAS_BACKEND=jax $(PYTEST) -n 2 -m "(backends or equality) and not slow" --durations=5
	KERAS_BACKEND=torch $(PYTEST) -n 2 -m "(backends or equality) and not slow" --durations=5

# Quick loop while developing: TensorFlow only, slow tests skipped.
test-fast: setup
	KERAS_BACKEND=tensorflow $(PYTEST) -n 2 -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
