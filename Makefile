# Two commands for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch is pinned to the CPU build this machine keeps on disk; a GPU machine may install any torch >= 2.6 first
TORCH ?= torch==2.13.0

.PHONY: demo test lint install install-dev clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/fitune train examples/smollm2-135m-lora.yaml --overwrite

lint: install-dev
	$(VENV)/bin/ruff check fitune tests bench examples
	$(VENV)/bin/ruff format --check fitune tests bench examples

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
