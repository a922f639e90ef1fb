# `make test`: a fresh machine to a green run. `make demo`: a real RL run that visibly learns.
VENV ?= .venv
PYTHON ?= python3
# torch must come first, pinned: other specs pull gigabytes of CUDA wheels on CPU-only machines.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.art-installed
PACKAGES := -e ".[dev,wandb,plot]" \
	-e "plugins/art_local[dev]" \
	-e "plugins/art_serverless[dev,server]" \
	-e "plugins/art_tinker[dev,server]" \
	-e "examples/third_party_backend[dev]"

.PHONY: install test lint typecheck pytest demo bench clean

$(STAMP): pyproject.toml plugins/*/pyproject.toml examples/*/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet $(PACKAGES)
	touch $@

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

demo: install
	$(BIN)/art demo

clean:
	rm -rf $(VENV) .art .mypy_cache .ruff_cache .pytest_cache
