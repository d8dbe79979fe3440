# femb: `make run` runs the demo pipeline (dvc repro), `make test` runs the test suite.
# Both create (or reuse) the virtual environment $(VENV).

VENV ?= .venv
PYTHON ?= python3
# torch is installed first so the pinned build is reused; override for another build,
# e.g. `make run TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"`.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
PREFECT_PORT ?= 4200
PREFECT_DB ?= $(HOME)/.prefect/prefect.db
STAMP := $(VENV)/.femb-installed

.PHONY: run test lint format venv clean prefect-server

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# dvc.yaml's stages run `python -m stages.<name>`: the environment's python must come first on PATH.
run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# A local Prefect server and UI for scheduled flows (SQLite, loopback only, no analytics).
prefect-server: $(STAMP)
	mkdir -p $(dir $(PREFECT_DB))
	DO_NOT_TRACK=1 PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false \
	PREFECT_SERVER_DATABASE_CONNECTION_URL=sqlite+aiosqlite:///$(abspath $(PREFECT_DB)) \
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) --analytics-off

clean:
	rm -rf $(VENV) data/demo data/shards models/train models/model.onnx models/model.md dvc_plots
