# make demo / make test work on a fresh clone: the virtualenv is created and filled on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vidtune demo --workdir demo-run

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/curate.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/real_size.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/sampler.py

clean:
	rm -rf demo-run .pytest_cache
