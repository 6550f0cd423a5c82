# `make demo` and `make test` work on a fresh machine: each creates the virtual environment and installs
# what it needs on first use. PyTorch wheels: torch 2.14.1 / torchvision 0.29.1 on x86_64 (on disk here);
# on aarch64 the matching CPU pair is 2.9.1 / 0.24.1. Override with `make TORCH=... TORCHVISION=...`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.effvit-installed
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH ?= 2.9.1
TORCHVISION ?= 0.24.1
else
TORCH ?= 2.14.1
TORCHVISION ?= 0.29.1
endif
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# pytest workers; each gets one BLAS thread so two workers use the two cores without oversubscription
JOBS ?= 2

.PHONY: install data browser kernels test test-fast demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH) torchvision==$(TORCHVISION)
	$(PY) -m pip install -q -e '.[dev,mobile]'
	touch $@

install: $(STAMP)

# Fashion-MNIST (real data for training runs) comes from Debian's dataset-fashion-mnist package.
data:
	@ls $(FASHION_MNIST)/*.gz >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

# Chromium for the browser test of `effvit serve` (tests/test_serve_browser.py, driven by Playwright), from
# Debian; where it cannot be installed that test is skipped and says why.
browser:
	@test -x /usr/bin/chromium || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; } || \
	  echo "chromium could not be installed: the browser test of effvit serve will be skipped"; }

# effvit's C++ attention kernel for OpenVINO (effvit/kernels/cpu), built from source with the machine's g++ and
# cmake (installed from Debian where missing); where that fails, a one-line notice and the standard graphs
kernels: install
	@{ command -v $${CXX:-c++} && command -v cmake; } >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq g++ cmake; } || true
	$(PY) -m effvit.kernels.cpu

test: install data browser kernels
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --durations=15

# the fast lane while working: every test not marked slow (multi-second end-to-end runs); CI runs `make test`
test-fast: install data kernels
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) -m "not slow"

# Fashion-MNIST end to end (effvit/cli/demo.py): train M0 from scratch, evaluate, predict, export, summary.
demo: install data
	$(PY) -m effvit demo

lint: install
	$(VENV)/bin/ruff check effvit tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache runs
