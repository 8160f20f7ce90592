# Two commands for a fresh machine (they create .venv and install what they need):
#   make main   -- the default experiment: EGN vs Adam vs SGD on California Housing (bundled data)
#   make test   -- the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= results/california_housing

.PHONY: main test lint install install-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[experiments]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[experiments,dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

main: install
	$(BIN)/gaussnewton run california_housing --out $(OUT)

test: install-dev
	$(BIN)/python -m pytest -n 2 -q

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
