# The two set-up commands of README.md:  `make run` (main job on the embedded default) and `make test`.
# Both create .venv on first use (about 2 minutes and 5.5 GB: PyPI's torch wheels are CUDA builds).
VENV   ?= .venv
PYTHON ?= python3
CORES  ?= 2
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run report test test-slow test-all lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[workflow,test]'
	touch $@

run: $(VENV)/.installed  ## run the workflow on config/config.yaml
	$(BIN)/snakemake --cores $(CORES)

report: $(VENV)/.installed  ## HTML report of the finished default run (tables, plots, captions)
	$(BIN)/snakemake --report results/report.html

lint: $(VENV)/.installed  ## ruff + snakemake --lint
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint

test: lint  ## lint, then the fast test suite (a few minutes on 2 cores)
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(VENV)/.installed  ## the end-to-end checks marked slow: the default DAG, signals, DDP (CI runs them)
	$(BIN)/python -m pytest -m slow

test-all: test test-slow  ## everything CI runs

bench: $(VENV)/.installed  ## FP vs BSQ training-step time
	$(BIN)/python benchmarks/step_time.py

clean:  ## remove workflow outputs of the default config (keeps committed results)
	rm -rf .snakemake logs benchmarks/logs results/default results/mlflow results/tables/default* results/plots/default
