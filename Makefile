# One entry point for a fresh clone: `make demo` and `make test` need nothing
# but Python >= 3.11. Every target creates the virtual environment on demand.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
SCALE ?= small

.PHONY: venv demo test test-all lint format bench scaling-data clean

venv: $(STAMP)

# torch is installed first and pinned by constraints.txt, so no later install
# can pull a different (multi-gigabyte) build.
$(STAMP): constraints.txt packages/gssm-data/pyproject.toml packages/llama-train/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch
	$(PIP) install -c constraints.txt -e packages/gssm-data -e "packages/llama-train[wandb,slurm,plot]" pytest ruff
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

scaling-data: venv
	$(BIN)/gssm-data scaling datasets/scaling.yaml --scale $(SCALE)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
