# `make test` installs everything into .venv and runs the test suite; `make demo` runs the demo.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU build of torch first: any other torch spec pulls gigabytes of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# JAX's CUDA plugin for the installed jax and the CUDA compiler (about 1.2 GB, no GPU
	# needed): XLA compiles GPU memory plans here (lomo-jax plan --target h100, the tests).
	$(PY) -m pip install -q -e '.[gpu-plans]' \
		"jax==$$($(PY) -c 'import importlib.metadata as m; print(m.version("jax"))')"
	touch $(STAMP)

install: $(STAMP)

# Two workers (pytest-xdist), a test file each at a time: module fixtures are built once.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/lomo-jax demo

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
