# The two commands of the README: `make demo` (the main job on the shipped data) and `make test`.
# Each creates the virtual environment at .venv if it is missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision builds to install when the venv has none (override for another platform).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS := test,triton,reproduce,audit,lightning
STAMP := $(VENV)/.installed
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
export CEM_FAST_CACHE ?= $(HOME)/.cache/cem_fast

.PHONY: demo test test-fast test-gpu-compat gpu-check-dry venv lint format bench results-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m reproduce.demo --out demo_out

# Every test (tests/gpu/ skips itself without a GPU). The C++ extension is compiled once into $(CEM_FAST_CACHE).
test: $(STAMP)
	$(PYTEST) tests

# Everything but the tests marked slow or gpu (the list is in tests/conftest.py): under two minutes, warm cache.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not gpu" tests

# The Triton tests in the GPU machine's versions (torch 2.11.0, Triton 3.6.0, numpy < 2.3): builds .venv-compat once (~5 GB).
test-gpu-compat:
	bash bench/compat_env.sh

# bench/gpu_check.sh's plumbing on the CPU (Triton interpreter, tiny shapes, CUDA-only steps skipped).
gpu-check-dry: $(STAMP)
	GPU_CHECK_DRY_RUN=1 OUT="$$(mktemp -d)" bash bench/gpu_check.sh

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) bench/bench_loss.py

# Every table and figure of reproduce/results/ rebuilt from the committed run records alone (reproduce/results/runs/;
# no training, no data); fails on any difference. `$(PY) -m reproduce.results_check --write` regenerates them.
results-check: $(STAMP)
	$(PY) -m reproduce.results_check

clean:
	rm -rf $(VENV) demo_out build dist *.egg-info
