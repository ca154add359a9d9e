# The two commands of the README: `make up` (the local stack and a demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: up test lint bench clean kafka

$(BIN)/abflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,test]'
	touch $@

up: $(BIN)/abflow
	$(BIN)/abflow up $(ARGS)

# The layers (import-linter), style (ruff) and types of the pure parts (mypy), then the tests.
test: lint
	$(BIN)/python -m pytest $(ARGS)

lint: $(BIN)/abflow
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(BIN)/abflow
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/bandit.py
	$(BIN)/python bench/report.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/dedup.py

# Apache Kafka's broker from Maven Central (Java 17+ and Maven), once: `make up ARGS="--broker kafka"`
# and `make test ARGS="--broker kafka"` run on it.
kafka: $(BIN)/abflow
	$(BIN)/python -m abflow.local.kafka

clean:
	rm -rf $(VENV) .abflow
