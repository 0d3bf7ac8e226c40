# Setup and checks. `make install` then `make test` is all a newcomer needs; `make help` lists the rest.
VENV   ?= .venv
PYTHON ?= python3
# Pinned so pip takes the CPU wheel where one is provided; override for CUDA, e.g. TORCH=torch==2.9.1
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint bench clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: ## Create .venv/ and install llmtrain (editable) with its dev extras
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@$(VENV)/bin/llmtrain --help >/dev/null && echo "installed: $(VENV)/bin/llmtrain"

# pytest exits 5 when it collects no tests: that counts as a failure here too.
# The suite runs in JOBS pytest-xdist workers with one torch thread each, so workers share the cores
# instead of oversubscribing them (two 2-thread processes on 2 cores slow small models many times over).
JOBS   ?= 2
test: ## Run the whole test suite (JOBS=2 workers, one thread each)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(JOBS)

test-fast: ## Run the tests that do not start the CLI in a subprocess (-m "not slow")
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(JOBS) -m "not slow"

lint: ## ruff check and ruff format --check (config in pyproject.toml)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: ## Time the training step of gpt_small (scripts/bench.py)
	$(PY) scripts/bench.py --preset gpt_small --steps 20

clean: ## Remove .venv/, outputs/, multirun/ and pytest's cache
	rm -rf $(VENV) outputs multirun .pytest_cache
