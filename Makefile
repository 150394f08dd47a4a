# Everyday commands. `make setup` once, then `make lint test-fast` while working; CI runs `make lint` and
# README's test command (`python -m pytest`, every test).
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup lint test-fast test demo

setup:
	python3 -m venv $(VENV) && $(BIN)/pip install torch==2.13.0 && $(BIN)/pip install -e ".[dev]"

lint:
	$(BIN)/ruff check .
	$(BIN)/mypy

# Skips the tests that start real processes (the CLI, the control process, the fault drills): a few minutes.
test-fast:
	$(BIN)/python -m pytest -m "not slow and not faults"

test:
	$(BIN)/python -m pytest

demo:
	$(BIN)/diffbatch run examples/batch.jsonl -o results.jsonl
