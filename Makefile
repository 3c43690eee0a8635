# Two commands on a fresh Debian/Ubuntu box: `make run` and `make test`.
# Everything else (venv, packages, mosquitto, model) is set up on demand.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
SOAK_ARGS ?=
LLAMA_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)

.PHONY: run test lint typecheck model build-deps system-deps venv bench llama-server llama-bench soak \
	reliability-report fresh-box install clean help

help:
	@echo "make run    - set up everything, then run the daemon in the foreground"
	@echo "make test   - set up everything, then lint, type-check and run the whole suite"
	@echo "make bench  - benchmark the daemon against raw llama-cpp-python, llama_cpp.server and"
	@echo "              llama-server (one client, then 1-8 concurrent clients)"
	@echo "make llama-server - build llama.cpp's llama-server (the benchmark's reference), print its path"
	@echo "make llama-bench  - build llama.cpp's llama-bench the same way, print its path"
	@echo "make soak   - 30 minutes of mixed load and faults, checked for losses and leaks"
	@echo "              (not part of make test; SOAK_ARGS='--minutes 3' for a short one)"
	@echo "make reliability-report - rebuild docs/reliability.md from run/reliability/"
	@echo "make fresh-box - time make run and make test on a fresh Debian box from a clean clone"
	@echo "              (needs root and the network; about 20 minutes; not part of make test)"

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/build-llama.sh scripts/llama-cmake-args.sh
	@$(MAKE) --no-print-directory build-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet --progress-bar off pip
	wheel=$$(scripts/build-llama.sh $(LLAMA_VERSION) $(BIN)/python) && \
		$(BIN)/python -m pip install --progress-bar off --force-reinstall --no-deps "$$wheel" && \
		$(BIN)/python -m pip install --progress-bar off "$$wheel"
	$(BIN)/python -m pip install --progress-bar off -e '.[dev]'
	@touch $@

# What making the venv needs from the system (the packages scripts/install.sh installs too):
# venv's ensurepip, and compilers for llama.cpp. Run by the venv's recipe, so only when the venv
# is (re)made; only what is missing is installed.
build-deps:
	@missing=""; \
	$(PYTHON) -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	include=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	test -e "$$include/Python.h" || missing="$$missing python3-dev"; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	command -v g++ >/dev/null 2>&1 || missing="$$missing g++"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			$$missing; \
	fi

# What the test suite runs besides Python: brokers and MQTT clients, systemd's tools (and
# procps: `systemd-analyze verify` wants the unit's ExecReload=/bin/kill to exist), openssl
# for the TLS tests' certificates, and what boots the Debian box the real-systemd tests
# install edgeagent into (mmdebstrap, systemd-nspawn; tests/container.py), and the browser the
# chat page is tested in (chromium and its chromedriver).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	command -v mosquitto_rr >/dev/null 2>&1 || missing="$$missing mosquitto-clients"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	test -x /bin/kill || missing="$$missing procps"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v mmdebstrap >/dev/null 2>&1 || missing="$$missing mmdebstrap"; \
	command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			$$missing; \
	fi

model: $(STAMP)
	$(BIN)/edgeagent model fetch

run: $(STAMP) model
	$(BIN)/edgeagent run

lint: $(STAMP)
	$(BIN)/ruff check edgeagent tests scripts
	$(BIN)/ruff format --check edgeagent tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) model system-deps lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP) model
	$(BIN)/python scripts/bench.py; a=$$?; $(BIN)/python scripts/bench_concurrency.py; b=$$?; \
	$(BIN)/python scripts/bench_structured.py; exit $$((a | b | $$?))

# llama.cpp's own server from the llama.cpp that the wheel vendors, same CPU flags, cached like
# the wheel; prints the binary's path (alone on stdout with `make -s llama-server`).
llama-server: $(STAMP)
	@scripts/build-llama-server.sh $(LLAMA_VERSION) $(BIN)/python

# llama.cpp's llama-bench, built the same way: llama.cpp's own prompt and decode speed here.
llama-bench: $(STAMP)
	@scripts/build-llama-server.sh $(LLAMA_VERSION) $(BIN)/python llama-bench

soak: $(STAMP) model system-deps
	$(BIN)/python scripts/soak.py $(SOAK_ARGS)

fresh-box: $(STAMP) system-deps
	$(BIN)/python scripts/fresh_box.py

reliability-report: $(STAMP)
	$(BIN)/python scripts/reliability_report.py

install:
	$(SUDO) scripts/install.sh

clean:
	rm -rf $(VENV) run .pytest_cache .mypy_cache .ruff_cache
