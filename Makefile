# `make test` and `make demo` work on a fresh machine: they create .venv and install the pinned
# dependencies (constraints.txt) before running.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: setup test lint demo clean

$(STAMP): pyproject.toml constraints.txt setup.py $(wildcard src/involution/csrc/*.cpp)
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch torchvision setuptools wheel ninja
	$(PIP) --no-build-isolation -e ".[dev,onnx]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -n 2 -q

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info src/involution/*.so
