# `make test` installs everything into .venv and runs the test suite; `make demo` runs the demo;
# `make test-latest` runs the suite on Python 3.12 with the newest jax / flax / optax / orbax.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-latest demo lint

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU build of torch first: any other torch spec pulls gigabytes of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,reference]'
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

# Python 3.12 and the newest release of every dependency, without torch (PyPI's torch is the
# CUDA build, gigabytes): the tests that compare with PyTorch skip, saying so. pyenv's
# python3.12 shim needs PYENV_VERSION; elsewhere it is ignored. PYTHON312=... names another.
PYTHON312 ?= env PYENV_VERSION=3.12.1 python3.12
VENV_LATEST ?= .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python

$(VENV_LATEST)/.installed: pyproject.toml Makefile
	$(PYTHON312) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install -q --upgrade pip
	$(PY_LATEST) -m pip install -q --upgrade -e '.[dev]'
	$(PY_LATEST) -m pip install -q -e '.[gpu-plans]' \
		"jax==$$($(PY_LATEST) -c 'import importlib.metadata as m; print(m.version("jax"))')"
	touch $@

test-latest: $(VENV_LATEST)/.installed
	HF_HUB_OFFLINE=1 $(PY_LATEST) -m pytest -q -n 2 --dist loadfile
