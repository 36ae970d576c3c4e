# lorakit: the two set-up commands of the README are `make demo` and `make test`.
# Both create .venv (CPU torch) and install lorakit with its test extras from this checkout.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-installed

.PHONY: install demo test test-fast lint format bench-cpu bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch (a bare `torch` would pull the CUDA build), then lorakit + test tools
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/demo.sh

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q

test-fast: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow"

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench-cpu: install
	$(PY) bench/finetune_cpu.py

clean:
	rm -rf out/demo .pytest_cache
