# Two commands on a fresh machine: `make sweep` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch. GPU users: `make sweep TORCH=` after installing their CUDA build
# into $(VENV) themselves (README, "GPU"), or TORCH='torch==2.13.0 --index-url <cuda index>'.
TORCH  ?= torch==2.13.0

.PHONY: install sweep quick test lint bench regress clean

install: $(VENV)/.installed

# mup (microsoft/mup), the oracle of tests/test_mup_oracle.py, goes in without its declared
# dependencies: they include torchvision, which pins a torch release and would replace $(TORCH) with
# a multi-GB CUDA build. Importing mup needs only torch and pyyaml (a dev extra).
MUP    := mup==1.0.0

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(strip $(TORCH)),$(BIN)/python -m pip install -q $(TORCH))
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(MUP)
	touch $@

sweep: install
	$(BIN)/python -m bench.sweep sweeps/init.toml

quick: install
	$(BIN)/python -m bench.sweep sweeps/quick.toml

test: install
	$(BIN)/python -m pytest

regress: install
	$(BIN)/python -m bench.regress run sweeps/quick.toml --against baselines/quick.json

lint: install
	$(BIN)/ruff check bench tests benchmarks

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-autosave --benchmark-columns=median,iqr,ops

clean:
	rm -rf $(VENV) reports .pytest_cache .benchmarks
