# Two commands on a fresh machine: `make demo` (the whole testbed on localhost) and
# `make test`. Each creates or refreshes the virtual environment in .venv by itself.
# `make check`: the fast tier, every test that starts none of the testbed's processes
# (the `process` marker, tests/conftest.py); `make test` runs every test.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# CPU builds of torch per architecture (see README, "Versions").
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif
STAMP := $(VENV)/.installed-$(ARCH)

.PHONY: demo test check bench bench-full venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/python -m central.launch --config configs/local.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

check: $(STAMP)
	$(BIN)/python -m pytest -q -m "not process" tests

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[plot]'
	$(BIN)/python -m scripts.bench --quick

bench-full: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[plot]'
	$(BIN)/python -m scripts.bench --full

clean:
	rm -rf runs bench-results .pytest_cache
