# The two commands that matter: `make run` (whole pipeline on configs/tiny.yaml) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take exactly this torch (a local CPU wheel here). On a GPU machine pass the CUDA build,
# e.g. make install TORCH_SPEC="torch==2.13.0 --index-url <PyTorch CUDA index for your driver>".
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/tiny.yaml
PYTEST_ARGS ?=

export PREFECT_SERVER_ANALYTICS_ENABLED = false
export DO_NOT_TRACK = 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 120
export RAY_USAGE_STATS_ENABLED = 0
export TOKENIZERS_PARALLELISM = false

.PHONY: install system-packages run serve test test-fast lint clean-state

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# System packages the tests drive (not `make run`): Debian's chromium (pages checked in headless Chromium) and
# PostgreSQL's server (the access database's tests start one). apt-get needs root; without it, the line says what to install.
SYSTEM_PACKAGES := chromium postgresql
system-packages:
	@if command -v chromium >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "install Debian's $(SYSTEM_PACKAGES) (as root: apt-get install $(SYSTEM_PACKAGES)), then run make again" >&2; exit 1; fi

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/optctl pipeline run --config $(CONFIG)
	$(BIN)/optctl access demo --config $(CONFIG)

# The local stack (Prefect server + worker with the deployments and their schedules, MLflow server, access
# service) in the foreground; Ctrl-C stops it all. `make run` needs none of it.
serve: install
	$(BIN)/optctl stack up --config $(CONFIG)

# Lint and type checks run first: CI checks them with every test run.
test: lint system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install system-packages
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Forget the embedded state (datasets, runs, MLflow, access DB) under .opt/.
clean-state:
	rm -rf .opt
