# One entry point for a fresh clone: `make demo` and `make test` need nothing
# but Python >= 3.11. Every target creates the virtual environment on demand.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
SCALE ?= small
TASKS ?= 4

.PHONY: venv demo test test-fast test-all lint format bench scaling-data scaling-laws clean

venv: $(STAMP)

# torch is installed first and pinned by constraints.txt, so no later install
# can pull a different (multi-gigabyte) build.
$(STAMP): constraints.txt packages/gssm-data/pyproject.toml packages/llama-train/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch
	$(PIP) install -c constraints.txt -e "packages/gssm-data[slurm]" -e "packages/llama-train[wandb,slurm,plot,hf]" \
		pytest ruff xarray nbclient nbformat ipykernel
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# `make test`: what .ci/run runs, everything but tests marked slow. `make test-fast`: the
# inner loop, also without tests marked integration (real Slurm, torchrun, trained-model
# fixtures, bootstrap fits, notebook, end to end). `make test-all` runs everything.
# None of them installs anything or starts a daemon: the Slurm tests skip unless a cluster
# answers (.ci/run starts a local one with tests/slurm/start-local-cluster.sh).
test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow and not integration"

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

# A scaling study from the scaling-data stores (only the regimes the study names, written
# first where missing: by study run here, by submit-scaling with SLURM=1): train every
# point (PARALLEL processes here, or SLURM=1: one array job), then the table, the fits
# (E free and E = exact entropy, per regime) and the plots, in runs/studies/$(SCALE)/.
STUDY ?= packages/llama-train/configs/studies/$(SCALE).yaml
STUDY_DIR ?= runs/studies/$(SCALE)
PARALLEL ?= 2

scaling-laws: venv
ifeq ($(SLURM),1)
	@test -f datasets/scaling/index-$(SCALE).json || { $(BIN)/gssm-data submit-scaling \
		datasets/scaling.yaml --scale $(SCALE) --tasks $(TASKS) --regimes-from $(STUDY) && \
		echo "Slurm is writing the stores: run this target again once they are done"; exit 1; }
	$(BIN)/llama-train study run $(STUDY) --slurm
	@echo "when every point is done (llama-train study status $(STUDY_DIR)):"
	@echo "  llama-train study collect $(STUDY_DIR) && llama-train study plot $(STUDY_DIR)"
else
	OMP_NUM_THREADS=1 $(BIN)/llama-train study run $(STUDY) --parallel $(PARALLEL)
	OMP_NUM_THREADS=1 $(BIN)/llama-train study collect $(STUDY_DIR)
	OMP_NUM_THREADS=1 $(BIN)/llama-train study plot $(STUDY_DIR)
endif

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
