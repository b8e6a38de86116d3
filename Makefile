# Two commands on a fresh machine: `make demo` (the whole testbed on localhost) and
# `make test`. Each creates or refreshes the virtual environment in .venv by itself.
# `make check`: the fast tier, every test that starts none of the testbed's processes
# (the `process` marker, tests/conftest.py); `make test` runs every test.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# CPU builds of torch per architecture (see docs/DEVELOPING.md, "Install"). On x86_64 the package
# index's torch wheel brings CUDA libraries (about 4 GB nothing here uses); the CPU-only
# build comes from PyTorch's own index, used when it answers within a few seconds.
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
TORCH_CPU := torch==2.14.1+cpu torchvision==0.29.1+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
endif
STAMP := $(VENV)/.installed-$(ARCH)

.PHONY: demo test check bench bench-full venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(ARCH),x86_64)
	@if timeout 5 $(BIN)/python -c "import urllib.request; urllib.request.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=3)" >/dev/null 2>&1; then \
		echo "venv: torch CPU-only build from $(TORCH_CPU_INDEX)"; \
		$(BIN)/python -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) $(TORCH_CPU); \
	else \
		echo "venv: $(TORCH_CPU_INDEX) cannot be reached; torch from the package index (with CUDA libraries: about 5.6 GB in .venv)"; \
		$(BIN)/python -m pip install -q $(TORCH); \
	fi
else
	$(BIN)/python -m pip install -q $(TORCH)
endif
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/python -m central.launch --config configs/local.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

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
