# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_CORE := $(VENV)/.installed-core
STAMP_DEV := $(VENV)/.installed-dev
STAMP_TRAIN := $(VENV)/.installed-train

.PHONY: demo test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_CORE): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(STAMP_CORE) $(STAMP_TRAIN)

# the demo trains through the pipeline: TA-Lib features, MLflow tracking, plots (the train extra)
$(STAMP_TRAIN): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train]'
	touch $@ $(STAMP_CORE)

demo: $(STAMP_TRAIN)
	$(BIN)/sigserve demo $(DEMO_ARGS)

test: $(STAMP_DEV)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP_DEV)
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP_DEV)
	$(BIN)/mypy src

bench: $(STAMP_DEV)
	$(BIN)/python bench/backfill.py
	$(BIN)/python bench/engine_latency.py

clean:
	rm -rf $(VENV) .sigserve .pytest_cache .mypy_cache .ruff_cache
