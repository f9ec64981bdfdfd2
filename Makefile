# The two commands: `make up` runs the system, `make test` runs every test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test check lint typecheck unit schema bench install clean

$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/fleet up

check: $(STAMP)
	$(BIN)/ruff check contracts services tests benchmarks
	$(BIN)/ruff format --check contracts services tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m contracts.export --check

test: check
	$(BIN)/pytest

schema: $(STAMP)
	$(BIN)/python -m contracts.export

bench: $(STAMP)
	$(BIN)/python -m benchmarks.startup
	$(BIN)/python -m benchmarks.stats_ingest
	$(BIN)/python -m benchmarks.sync_catalog
	$(BIN)/python -m benchmarks.benchmark_accuracy
	$(BIN)/python -m benchmarks.planner_dag

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
