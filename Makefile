# Two commands for a fresh machine (they create .venv and install what they need):
#   make main   -- the default experiment: EGN vs Adam vs SGD on California Housing (bundled data)
#   make test   -- the test suite (library tests and harness tests)
# Two packages live in this repository: the library `gaussnewton` (pyproject.toml, core
# dependencies only) and the experiment harness `gaussnewton-experiments` (experiments/, with the
# data sets, the RL code and the `gaussnewton-experiments` command). Both install editable.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= results/california_housing

.PHONY: main test docs lint install install-dev results

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml experiments/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e . -e experiments
	touch $@

$(VENV)/.installed-dev: pyproject.toml experiments/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]" -e "experiments[rl]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

main: install
	$(BIN)/gaussnewton-experiments run california_housing --out $(OUT)

# the results pages: run (resume) the plan of gaussnewton_experiments.results at its stated budgets
# into results/pages/, then regenerate the delimited blocks of docs/results.md, docs/results_rl.md
# and the README (plus docs/figures/*.png) from the records; RESULTS_ARGS=--no-run only re-renders
results: install-dev
	$(BIN)/gaussnewton-experiments results --records results/pages --docs docs --readme README.md $(RESULTS_ARGS)

test: install-dev
	$(BIN)/python -m pytest -n 2 -q

# the API site from the docstrings; warnings are errors (CI runs it after the tests)
docs: install-dev
	$(BIN)/python -m pip install -q -e ".[docs]"
	$(BIN)/mkdocs build --strict -d site

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
