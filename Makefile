# The two commands of the README: `make up` (the local stack and a demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: up test bench clean

$(BIN)/abflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

up: $(BIN)/abflow
	$(BIN)/abflow up $(ARGS)

test: $(BIN)/abflow
	$(BIN)/python -m pytest $(ARGS)

bench: $(BIN)/abflow
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/bandit.py
	$(BIN)/python bench/report.py
	$(BIN)/python bench/rollout.py

clean:
	rm -rf $(VENV) .abflow
