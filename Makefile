# DMAT: the two commands users need are `make repro` and `make test`; each installs what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
INSTALLED := $(VENV)/.dmat-installed

.PHONY: install repro test lint bench gpu-check container-base container-pipeline-test clean-venv

# Create .venv if missing and install the pinned dependencies plus the package (editable).
$(INSTALLED): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(INSTALLED)

# Rebuild the whole pipeline with the committed params.yaml.
repro: install
	PATH="$(BIN):$$PATH" $(BIN)/dvc repro

# Lint, then the whole test suite (slow end-to-end and container tests included; see the README for deselecting).
test: install lint
	PATH="$(BIN):$$PATH" $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/hadolint Dockerfile containers/*.Containerfile

# Speed and memory figures (not tests): see benchmarks/README.md.
bench: install
	PATH="$(BIN):$$PATH" $(BIN)/python -m benchmarks

# The paper-scale path on a GPU machine (benchmarks/gpu_check.py: at most ~8 minutes on one H100); prints JSON,
# exits 1 if a check failed. Without CUDA: a dry run of the parts that need no GPU, on the CPU.
gpu-check: install
	PATH="$(BIN):$$PATH" $(BIN)/python -m benchmarks.gpu_check

# Local stand-ins for the registry base images (root: debootstrap), for machines without a container registry.
container-base:
	containers/build-local-base.sh

# The pipeline image (torch: gigabytes) built and a tiny `dvc repro` run inside it; not part of `make test`.
# TORCH_INDEX_URL=https://pypi.org/simple where download.pytorch.org is unreachable (PyPI's torch is the CUDA build).
container-pipeline-test: install
	DMAT_TEST_PIPELINE_IMAGE=1 PATH="$(BIN):$$PATH" $(BIN)/python -m pytest tests/containers/test_pipeline_image.py

clean-venv:
	rm -rf $(VENV)
