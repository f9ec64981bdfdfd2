# The two commands: `make up` runs the system, `make test` runs every test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test chaos check lint typecheck unit schema bench install tools rules clean

$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# What the tests use beyond the venv, from Debian (bookworm) packages: promtool (the
# `prometheus` package) for the alert rules, Chromium and its driver for the status page's
# browser test, kubectl (`kubectl kustomize` renders deploy/k8s; the package of Google's
# Kubernetes apt repository, as Debian's kubernetes-client is too old for its kustomize).
# Installed when missing, as root (CI is a fresh machine of the same kind).
DEBIAN_TOOLS := promtool:prometheus chromium:chromium chromedriver:chromium-driver kubectl:kubectl
tools:
	@missing=""; for pair in $(DEBIAN_TOOLS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "install as root:$$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The alert rules load and their unit tests pass (first occurrences fire, see the file).
rules: tools
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts.test.yml

# deploy/.env: the passwords of compose and Kubernetes (deploy/README.md), random, made once.
deploy-env:
	deploy/gen-env.sh

# the development stack, with sync and benchmark pointed at `fleet demo`'s local servers
up: $(STAMP)
	$(BIN)/fleet up --demo

check: $(STAMP)
	$(BIN)/ruff check contracts services tests benchmarks
	$(BIN)/ruff format --check contracts services tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m contracts.export --check

test: check rules
	$(BIN)/pytest

# The fault tests alone (`make test` runs them too): SIGKILLed services, NATS and PostgreSQL
# restarted, and three replicas of each service on a three-node JetStream cluster.
chaos: $(STAMP)
	$(BIN)/pytest tests/e2e/test_chaos.py tests/e2e/test_cluster.py tests/e2e/test_cluster_outbox.py

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
