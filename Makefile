# Two commands for a newcomer: `make run` (start the service) and `make test` (the whole suite).
# `make run SERVE_ARGS='--model DIR --port 8080'` passes options to `dense-serve serve`.
# Both create .venv/ and install exactly the lock files in requirements/ (pip --require-hashes); only
# Python >= 3.11 is assumed. `make run` installs what serving needs (requirements/worker.txt), `make test`
# everything the suite needs (requirements/dev.txt). `make lock` rewrites the lock files from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
# Which torch: `cpu`, PyTorch's CPU build (Linux x86_64 without an NVIDIA GPU: no CUDA libraries to download),
# or `pypi`, PyPI's own (the CUDA 13 build on Linux x86_64 with a GPU, the CPU build on macOS and aarch64).
TORCH ?= $(shell if [ "$$(uname -sm)" = "Linux x86_64" ] && ! nvidia-smi -L >/dev/null 2>&1; then echo cpu; else echo pypi; fi)
RUN_STAMP := $(VENV)/.installed-worker
DEV_STAMP := $(VENV)/.installed-dev
# What `make run` needs: the serving lock, or the suite's (a superset) where that is already installed.
SERVE_STAMP := $(if $(wildcard $(DEV_STAMP)),$(DEV_STAMP),$(RUN_STAMP))
TINY := .cache/tiny
OUT ?= out
PYTEST_WORKERS ?= 2

.PHONY: install run demo lock bench-http bench-keyed bench-sizes bench-codecs bench-steps gpu-wheels gpu-check-smoke chaos soak fuzz proto robot test lint clean

# install_lock LOCK EDITABLES: a venv holding exactly requirements/LOCK.txt and the chosen torch, then the
# project itself without dependencies. pip's output goes to $(VENV)/install.log; the terminal gets one line.
define install_lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: dense-serve needs Python >= 3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing requirements/$(1).txt and torch ($(TORCH)) into $(VENV)/ (pip's log: $(VENV)/install.log)"
	@start=$$(date +%s); \
	{ $(PIP) install --require-hashes --no-deps -r requirements/torch-$(TORCH).txt \
	  && $(PIP) install --require-hashes --no-deps -r requirements/$(1).txt \
	  && $(PIP) install --no-deps --no-build-isolation $(2); } >$(VENV)/install.log 2>&1 \
	  || { tail -n 20 $(VENV)/install.log; echo "error: the install failed; pip's whole log is $(VENV)/install.log"; exit 1; }; \
	echo "installed in $$(( $$(date +%s) - start )) s; $(VENV)/ holds $$(du -sh $(VENV) | cut -f1)"
	@touch $@
endef

$(RUN_STAMP): requirements/worker.txt requirements/torch-$(TORCH).txt pyproject.toml
	$(call install_lock,worker,-e .)

$(DEV_STAMP): requirements/dev.txt requirements/torch-$(TORCH).txt pyproject.toml clients/python/pyproject.toml
	$(call install_lock,dev,-e . -e ./clients/python)

install: $(DEV_STAMP)

run: $(SERVE_STAMP)
	@$(BIN)/dense-serve serve $(SERVE_ARGS)

demo: $(SERVE_STAMP)
	@echo "== dense-serve predict on the sample with the models make run serves by default (dense-serve models) =="
	$(BIN)/dense-serve predict assets/sample.png --format png,npy,color --out $(OUT)
	$(BIN)/dense-serve predict assets/sample.png --task normals --format png,npy,color --out $(OUT)

bench-http: $(DEV_STAMP)
	$(BIN)/python load_tests/bench_http.py $(ARGS)

# The data path at 640x480, 1080p and 4K through a real server; BEFORE=<git ref> measures that commit too.
bench-sizes: $(DEV_STAMP)
	$(BIN)/python -m load_tests.bench_sizes $(if $(BEFORE),--before $(BEFORE)) $(ARGS)

# Keyed answers at volume: the client's defaults over 240 1080p JPEGs through Redis with maxmemory 256mb.
bench-keyed: $(DEV_STAMP)
	$(BIN)/python -m load_tests.keyed_volume $(ARGS)

bench-steps: $(DEV_STAMP)
	$(BIN)/python -m load_tests.bench_steps $(ARGS)

bench-codecs: $(DEV_STAMP)
	$(BIN)/python -m load_tests.bench_codecs $(ARGS)

# The GPU check (load_tests/gpu_check.py; docs/benchmarks.md#gpu-check-one-lease): the wheels a lent GPU machine
# lacks, built for its CPython 3.12 into .gpu-wheels/ (carried with the device tool's `carry`), and the same
# check on the CPU with the tiny model, which proves the script before a lease.
gpu-wheels: $(DEV_STAMP)
	$(BIN)/python -m load_tests.gpu_wheels --out .gpu-wheels

gpu-check-smoke: $(DEV_STAMP)
	$(BIN)/python -m load_tests.gpu_check --cpu-smoke --out $(OUT)/gpu-check-smoke

# schemathesis against a real server (tests/test_openapi_fuzz.py) with more cases than the suite's 100 per operation.
fuzz: $(DEV_STAMP)
	DENSE_FUZZ_EXAMPLES=$(or $(EXAMPLES),500) $(BIN)/python -m pytest -q -p no:cacheprovider -s tests/test_openapi_fuzz.py

proto: $(DEV_STAMP)
	$(BIN)/python -m service.grpc.codegen

robot: $(DEV_STAMP)
	$(BIN)/python -m load_tests.robot_stream --spawn $(ARGS)

chaos: $(DEV_STAMP)
	$(BIN)/python -m load_tests.kill_worker $(ARGS)

# Ten minutes of steady load on Redis while workers are killed and Redis restarts (ARGS="--minutes 2" for less).
soak: $(DEV_STAMP)
	$(BIN)/python -m load_tests.soak $(ARGS)

test: $(DEV_STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

# The import contracts (pyproject.toml [tool.importlinter], docs/architecture.md) ride along with ruff.
lint: $(DEV_STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/lint-imports --no-cache --no-logo

# Rewrite requirements/*.txt from pyproject.toml and requirements/*.in (docs/development.md: "Updating a dependency").
# ARGS="--upgrade-package NAME" moves one package, ARGS=--upgrade all; TORCH_CPU_WHEELS=DIR reads the CPU
# build of torch from a local folder where PyTorch's index cannot be reached.
lock: $(DEV_STAMP)
	UV=$(BIN)/uv bash requirements/lock.sh $(ARGS)

clean:
	rm -rf $(VENV) .cache $(OUT) .pytest_cache .ruff_cache .gpu-wheels
