# Two commands for a fresh machine (Python 3.11): `make demo` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install install-test demo test

install:
	$(PIP) install -q -e .

# torch==2.13.0 is the CPU build (numerical reference only); torchcfm and torch-fidelity are
# installed without their dependencies so that torch stays that build and torchvision stays out.
install-test: install
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps torchcfm torch-fidelity

demo: install
	$(PYTHON) -m lfm_jax.main --config=configs/default.py --workdir=$(WORKDIR)

test: install-test
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)
