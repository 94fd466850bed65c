# Two commands on a fresh machine: `make run` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test quality style bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstalled when pyproject.toml changes. torch==2.13.0 comes from this machine's local CPU wheel.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,service,dev]'
	touch $@

install: $(VENV)/.installed

# The main job: train the tiny preset on the bundled example images and print where the adapter is.
run: install
	$(BIN)/dopsd train --preset tiny-z-image --images examples/concept --captions examples/concept/captions.json \
		--trigger sks --steps 30 --out outputs/example

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
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
