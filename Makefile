# The two commands of the README: `make demo` (the main job on the shipped data) and `make test`.
# Each creates the virtual environment at .venv if it is missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision builds to install when the venv has none (override for another platform).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
export CEM_FAST_CACHE ?= $(HOME)/.cache/cem_fast

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test,triton]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m reproduce.demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) bench/bench_loss.py

clean:
	rm -rf $(VENV) demo_out build *.egg-info
