# Two entry points on a fresh clone: `make demo` and `make test`. Each makes its own virtual environment.
# TORCH is what pip installs for PyTorch; the default is the CPU build. With a GPU, install torch your own way,
# e.g. `make test TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test,lora,bench]"
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.installed
	$(VENV)/bin/preftune demo --out demo-run

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench_dpo.py
