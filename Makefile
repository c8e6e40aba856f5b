# Two entry points, each doing all set-up on a fresh machine: `make example` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled

.PHONY: example test lint

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

example: $(BIN)/.installed
	$(BIN)/hqsam refine examples/shapes/annotations.json --out example-out --format coco --overwrite

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest
