# One entry point for a fresh clone: `make demo` and `make test` need nothing
# but Python >= 3.11. Every target creates the virtual environment on demand.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
SCALE ?= small
TASKS ?= 4

.PHONY: venv demo test test-all lint format bench scaling-data clean

venv: $(STAMP)

# torch is installed first and pinned by constraints.txt, so no later install
# can pull a different (multi-gigabyte) build.
$(STAMP): constraints.txt packages/gssm-data/pyproject.toml packages/llama-train/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch
	$(PIP) install -c constraints.txt -e packages/gssm-data -e "packages/llama-train[wandb,slurm,plot,hf]" \
		pytest ruff xarray nbclient nbformat ipykernel
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Fast suite (slow tests excluded); `make test-all` runs everything.
test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-all: lint
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python -m pytest -q -s tests/benchmarks -p no:cacheprovider -o python_files='bench_*.py'

demo: venv
	$(BIN)/python scripts/demo.py

# SLURM=1: one Slurm array of TASKS tasks per regime, then a job writing the index
# (gssm-data submit-scaling); unset, the stores are written here.
scaling-data: venv
ifeq ($(SLURM),1)
	$(BIN)/gssm-data submit-scaling datasets/scaling.yaml --scale $(SCALE) --tasks $(TASKS)
else
	$(BIN)/gssm-data scaling datasets/scaling.yaml --scale $(SCALE)
endif

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
