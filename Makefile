# The commands the README names. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install services services-compose lint test test-fast demo bench clean

# Every dependency at the version and hash requirements-dev.lock names; then this checkout,
# resolving nothing again. Regenerate the locks after changing pyproject.toml's dependencies:
#   pip-compile --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
#     --extra dev -o requirements-dev.lock pyproject.toml   (and --extra flower -o requirements.lock)
$(VENV)/.installed: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Debian or Ubuntu: installs what is missing with `sudo apt-get` (redis-server, postgresql,
# rabbitmq-server, docker-compose, prometheus for promtool), then starts the three servers.
services:
	bash scripts/services.sh

# Anywhere with Docker: the same three servers from compose.test.yaml, on loopback, once healthy.
# Then `make test SERVICES=services-compose`.
services-compose:
	docker compose -f compose.test.yaml up -d --wait

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy models tasks worker
	$(BIN)/lint-imports

# The whole suite: unit, integration (real Redis, Postgres, RabbitMQ, workers, sandbox) and chaos,
# in four lanes (pytest-xdist): the chaos scenarios run one at a time, as do the RabbitMQ tests
# (tests/conftest.py), beside the rest. Most tests wait on their worker processes, so more lanes
# than cores finish sooner (on this 2-core machine: three lanes 861 s against 1,265 s for two,
# both beside other work). With four the cores are busy all the time (idle < 5%), a third of it
# in CLI processes (~1 s of imports each): tests poll the store directly, and make a migrated
# store from a template (tests/services.py), rather than start one. A fresh clone, nothing
# beside: 626 tests in 605 s for 2,296 s of tests (767 s for 602 before those two changes).
SERVICES ?= services
test: install $(SERVICES) lint
	$(BIN)/pytest -q -n 4 --dist loadgroup --durations=15

# Unit tests only: no services needed.
test-fast: install
	$(BIN)/pytest -q tests/unit

demo: install
	$(BIN)/accumsync demo

# The five end-to-end benchmarks (bench/README.md lists all seven and the soak): long, noisy on a
# busy machine, never run by CI.
bench: install services
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.flush
	$(BIN)/python -m bench.mixed
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.freshness

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
