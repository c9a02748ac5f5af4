# dp-bias: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PARAMS ?= params/default.yaml
JOBS ?= 2
STAMP := $(VENV)/.installed
# The notebooks' Jupyter kernel (their metadata and the runner name it; dpbias_utils.paths.KERNEL).
KERNEL := dp-bias
# No hub-offline default here: `dpbias` itself runs offline a profile that needs no hub asset, and a
# hub-using profile downloads (or, after `make prefetch`, runs with HF_HUB_OFFLINE=1 as Slurm jobs do).
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help setup demo study test test-fast lab validate dry-run prefetch preflight benchmarks clean-runs

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-installs only when the dependency declarations change (idempotent, seconds otherwise).
$(STAMP): pyproject.toml constraints.txt Makefile | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,lab]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python 3 (dp-bias)" >/dev/null
	touch $(STAMP)

setup: $(STAMP) ## Create .venv (torch first, then the package with the lab and dev extras) and register its Jupyter kernel

study: setup ## Run the whole study on $(PARAMS) (default: embedded CPU profile) -> runs/<profile>/index.html
	$(BIN)/dpbias run $(PARAMS) --jobs $(JOBS)

demo: setup ## The whole chain at toy size (tests/profiles/tiny.yaml), a few minutes -> runs/tiny/index.html
	$(BIN)/dpbias run tests/profiles/tiny.yaml --jobs $(JOBS)

# Two pytest workers (pytest-xdist), a test module at a time on one worker (`loadscope`: a module's
# fixtures, e.g. a study it builds once, are built once), the study-building modules handed out first
# (tests/conftest.py: FIRST); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
PYTEST_PAR := $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)

test: setup ## Run the test suite, offline, on $(TEST_WORKERS) workers; installs nothing (Slurm tests skip without a cluster: docs/running.md)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_PAR) tests

test-fast: setup ## Unit tests only (skips notebook and whole-study tests)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_PAR) tests -m "not slow"

lab: setup ## Open JupyterLab on the notebooks
	$(BIN)/jupyter lab notebooks/

validate: setup ## Validate a profile: make validate PARAMS=params/x.yaml
	$(BIN)/dpbias validate $(PARAMS)

dry-run: setup ## Print the plan of a profile without running it
	$(BIN)/dpbias run $(PARAMS) --dry-run

prefetch: setup ## Download every hub asset of $(PARAMS) into the standard caches and check each loads
	$(BIN)/dpbias prefetch $(PARAMS)

preflight: setup ## On the machine that will run $(PARAMS): assets load, a few steps of each training way, throughput
	$(BIN)/dpbias preflight $(PARAMS)

benchmarks: setup ## Run the speed/memory benchmarks (ratios measured side by side)
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-runs: ## Delete generated run outputs (runs/)
	rm -rf runs/
