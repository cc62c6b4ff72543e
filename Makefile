# The commands the README names. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install services lint test test-fast demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

services:
	bash scripts/services.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy models tasks worker

# The whole suite: unit, integration (real Redis, Postgres, workers, sandbox) and chaos.
test: install services lint
	$(BIN)/pytest -q

# Unit tests only: no services needed.
test-fast: install
	$(BIN)/pytest -q tests/unit

demo: install
	$(BIN)/accumsync demo

# The four benchmarks (README, Performance): long, noisy on a busy machine, never run by CI.
bench: install services
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.flush
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.freshness

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
