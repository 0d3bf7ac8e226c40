# Setup and checks. `make install` then `make test` is all a newcomer needs.
VENV   ?= .venv
PYTHON ?= python3
# Pinned so pip takes the CPU wheel where one is provided; override for CUDA, e.g. TORCH=torch==2.9.1
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: install test lint bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@$(VENV)/bin/llmtrain --help >/dev/null && echo "installed: $(VENV)/bin/llmtrain"

# pytest exits 5 when it collects no tests: that counts as a failure here too.
test:
	$(PY) -m pytest -q -p no:cacheprovider

bench:
	$(PY) scripts/bench.py --preset gpt_small --steps 20

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
