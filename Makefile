# femb: `make run` runs the demo job, `make test` runs the test suite.
# Both create (or reuse) the virtual environment $(VENV).

VENV ?= .venv
PYTHON ?= python3
# torch is installed first so the pinned build is reused; override for another build,
# e.g. `make run TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"`.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO ?= data/demo
SHARDS ?= data/shards

BIN := $(VENV)/bin
STAMP := $(VENV)/.femb-installed

.PHONY: run test lint format venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/femb synth $(DEMO)
	$(BIN)/femb convert $(DEMO) $(SHARDS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) data/demo data/shards
