# Two commands do all set-up on a fresh machine: `make quickstart` and `make test`.
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

.PHONY: install quickstart test lint
install: $(BIN)/mobilemoe

quickstart: install
	$(BIN)/mobilemoe quickstart $(if $(FAST),--fast,)

# `pytest` alone skips the slow checks (quick loop while developing); CI runs them as well.
test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check src tests bench
