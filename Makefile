# msdn-tf developer entry points. Needs Python 3.10+ (python3) with venv, and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "msdn-tf needs Python 3.10 or newer, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(STAMP)

# Train, evaluate and print the result table on the built-in demo dataset (no download).
demo: $(STAMP)
	$(PY) -m msdn_tf.train --dataset demo

# Lint and format check (ruff), the layer contracts (import-linter; both set in pyproject.toml),
# then the test suite (CPU, a few minutes).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
