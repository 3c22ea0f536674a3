PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo test test-slow bench clean

# Install into a virtual environment: CPU torch first (a bare `torch` pulls a CUDA build),
# then the package with its test extras.
install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'

# The whole pipeline on the embedded demo model, offline.
demo: install
	bash scripts/demo.sh

test:
	$(BIN)/python -m pytest tests -q

test-slow:
	$(BIN)/python -m pytest tests -q -m slow

bench:
	$(BIN)/python bench/decompose.py
	$(BIN)/python bench/runtime.py
	$(BIN)/python bench/memory.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
