# Two commands on a fresh machine: `make train` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train preprocess test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

preprocess: $(STAMP)
	$(BIN)/python -m pipelines.preprocess

train: $(STAMP)
	$(BIN)/python -m pipelines.preprocess
	$(BIN)/python -m pipelines.train

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf data/processed outputs mlruns mlflow.db .pytest_cache
