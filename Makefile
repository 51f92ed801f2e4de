# Two commands for a newcomer: `make demo` (set up, run the whole workflow on the CPU demo) and
# `make test` (set up, run the tests). Both create .venv with the pinned CPU stack.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Override on a GPU machine to get its CUDA build, e.g. `make test TORCH=torch==2.14.1`.
TORCH ?= torch==2.13.0

.PHONY: setup demo demo-methods test check lint clean-demo

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/activate

setup: $(BIN)/activate

demo: setup
	$(BIN)/snakemake --configfile demo/config.yaml --cores 2

# Every method (H2O, KVzap and the reference points) on the same demo, perplexity only.
demo-methods: setup
	$(BIN)/snakemake --configfile demo/methods.yaml --cores 2

test: setup
	$(BIN)/python -m pytest -q

# The fast tier for a developer's loop: lint, and every test but those marked slow (the end-to-end
# workflow runs and the longest Triton-interpreter tests; `make test` runs them all).
check: setup
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests
	$(BIN)/python -m pytest -q -x -m "not slow"

lint: setup
	$(BIN)/ruff check src tests && $(BIN)/snakemake --lint
