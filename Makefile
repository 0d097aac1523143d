# Two entry points on a fresh clone: `make demo` and `make test`. Each makes the virtual environment if it is
# missing and installs only what it needs (the demo: preftune alone; the tests: plus pytest, hypothesis, peft, and
# TRL, which the tests compare losses with);
# run again, each skips what is already installed.
# TORCH is the pip requirement for PyTorch; TORCH_INDEX, when set, is the package index it comes from. A plain
# `torch==2.13.0` from PyPI is the CUDA build on Linux (large; runs on a CPU too). For the CPU-only build there:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
VENV ?= .venv
PIP = $(VENV)/bin/pip

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[test,lora,bench]"
	touch $@

$(VENV)/.bench: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[lora,bench]"
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.demo
	$(VENV)/bin/preftune demo --out demo-run

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest

bench: $(VENV)/.bench
	$(VENV)/bin/python benchmarks/bench_dpo.py
