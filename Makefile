# Set-up lives here so that a fresh clone needs only `make train` or `make test`.
# TORCH_SPEC pins the PyTorch release reslab is tested with; on the development machines a
# CPU build of exactly that release is on disk, elsewhere pip takes the normal build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all,test
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test lint notebooks clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: reslab's default training run (resnet20 on the embedded digits data).
train: $(STAMP)
	$(BIN)/reslab train

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# The course notebooks, executed in a fresh kernel of the venv with their outputs written back
# (a few minutes each on 2 cores); `make test` runs copies of them on small data.
notebooks: $(STAMP)
	$(BIN)/python notebooks/run_notebooks.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
