# jaxnets: `make run` and `make test` each set everything up on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py jaxnets/ops/csrc/onednn_conv.cc
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: install
	$(PY) -m experiments.tour --jobs 2

test: install
	$(PY) -m pytest -q -m "not slow" -n auto --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check jaxnets experiments tests
	$(PY) -m ruff format --check jaxnets experiments tests

bench: install
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 || echo "torch==2.13.0 not installable here: the torch column will say so"
	$(PY) -m experiments.bench

clean:
	rm -rf $(VENV) .pytest_cache
