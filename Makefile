# Every target does its own set-up on a fresh Debian machine: system packages, .venv, pip.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-quick system-deps lint bench clean

$(VENV): pyproject.toml
	$(MAKE) system-deps
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch pinned exactly: pip takes the CPU build from local disk.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(VENV)

system-deps:
	@if [ ! -d $(FASHION_MNIST) ]; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; fi

demo: $(VENV)
	$(BIN)/edgewise demo

test: $(VENV)
	$(BIN)/pytest

test-quick: $(VENV)
	$(BIN)/pytest -m 'not slow' -x -q

lint: $(VENV)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
