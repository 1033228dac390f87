# Two commands for a newcomer: `make run` (start the service) and `make test` (the whole suite).
# `make run SERVE_ARGS='--model DIR --port 8080'` passes options to `dense-serve serve`.
# Both create .venv/ and install everything; only Python >= 3.11 is assumed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch keeps the install lean on machines without a GPU. Override TORCH_SPEC to pick
# another build, and set TORCH_INDEX to a wheel index (for example PyTorch's CPU index) to use it.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
TINY := .cache/tiny
OUT ?= out
PYTEST_WORKERS ?= 2

.PHONY: install run demo bench-http bench-sizes bench-codecs bench-steps gpu-wheels gpu-check-smoke chaos soak fuzz proto robot test lint clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "dense-serve needs Python >= 3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e './clients/python[all]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dense-serve serve $(SERVE_ARGS)

demo: $(STAMP)
	@echo "== dense-serve predict on the sample with the models make run serves by default (dense-serve models) =="
	$(BIN)/dense-serve predict assets/sample.png --format png,npy,color --out $(OUT)
	$(BIN)/dense-serve predict assets/sample.png --task normals --format png,npy,color --out $(OUT)

bench-http: $(STAMP)
	$(BIN)/python load_tests/bench_http.py $(ARGS)

# The data path at 640x480, 1080p and 4K through a real server; BEFORE=<git ref> measures that commit too.
bench-sizes: $(STAMP)
	$(BIN)/python -m load_tests.bench_sizes $(if $(BEFORE),--before $(BEFORE)) $(ARGS)

bench-steps: $(STAMP)
	$(BIN)/python -m load_tests.bench_steps $(ARGS)

bench-codecs: $(STAMP)
	$(BIN)/python -m load_tests.bench_codecs $(ARGS)

# The GPU check (load_tests/gpu_check.py; docs/benchmarks.md#gpu-check-one-lease): the wheels a lent GPU machine
# lacks, built for its CPython 3.12 into .gpu-wheels/ (carried with the device tool's `carry`), and the same
# check on the CPU with the tiny model, which proves the script before a lease.
gpu-wheels: $(STAMP)
	$(BIN)/python -m load_tests.gpu_wheels --out .gpu-wheels

gpu-check-smoke: $(STAMP)
	$(BIN)/python -m load_tests.gpu_check --cpu-smoke --out $(OUT)/gpu-check-smoke

# schemathesis against a real server (tests/test_openapi_fuzz.py) with more cases than the suite's 100 per operation.
fuzz: $(STAMP)
	DENSE_FUZZ_EXAMPLES=$(or $(EXAMPLES),500) $(BIN)/python -m pytest -q -p no:cacheprovider -s tests/test_openapi_fuzz.py

proto: $(STAMP)
	$(BIN)/python -m service.grpc.codegen

robot: $(STAMP)
	$(BIN)/python -m load_tests.robot_stream --spawn $(ARGS)

chaos: $(STAMP)
	$(BIN)/python -m load_tests.kill_worker $(ARGS)

# Ten minutes of steady load on Redis while workers are killed and Redis restarts (ARGS="--minutes 2" for less).
soak: $(STAMP)
	$(BIN)/python -m load_tests.soak $(ARGS)

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

clean:
	rm -rf $(VENV) .cache $(OUT) .pytest_cache .ruff_cache .gpu-wheels
