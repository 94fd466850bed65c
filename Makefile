# Two commands on a fresh machine: `make run` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run example stack stack-down migrate test quality style bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstalled when pyproject.toml changes. torch==2.13.0 comes from this machine's local CPU wheel.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,service,dev]'
	touch $@

install: $(VENV)/.installed

# The main job: the service on 127.0.0.1:8000 in embedded mode (SQLite, filesystem broker, local artifacts, one
# real Celery worker process). The development key below is for this local mode only.
DOPSD_DEV_API_KEY ?= dopsd_dev_local_only
run: install
	DOPSD_ENVIRONMENT=development DOPSD_DEV_API_KEY=$(DOPSD_DEV_API_KEY) $(BIN)/dopsd serve

# The trainer alone: the tiny preset on the bundled example images; prints where the adapter is.
example: install
	$(BIN)/dopsd train --preset tiny-z-image --images examples/concept --captions examples/concept/captions.json \
		--trigger sks --steps 30 --out outputs/example

# The production-shaped stack on loopback: PostgreSQL, Redis, SeaweedFS S3, the API on :8000 and one worker.
stack: install
	$(BIN)/python scripts/stack.py up

stack-down:
	$(BIN)/python scripts/stack.py down

migrate: install
	$(BIN)/dopsd migrate

test: install
	$(BIN)/python -m pytest -q

quality: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

style: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python bench/step_cost.py

clean:
	rm -rf outputs var .pytest_cache .mypy_cache .ruff_cache
