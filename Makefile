.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

venv: $(STAMP) ## create .venv and install klsym with its dev extras

test: $(STAMP) ## run the test suite (doctests and notebooks included), one worker per core (at most 4)
	$(BIN)/python -m pytest -n auto --maxprocesses=4

report: $(STAMP) ## build the report into reports/
	$(BIN)/python -m klsym report

lab: $(STAMP) ## open JupyterLab on notebooks/
	$(BIN)/jupyter lab --notebook-dir=notebooks

lint: $(STAMP) ## lint and check formatting (ruff, configured in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## run the benchmarks (ratios against a baseline measured in the same run)
	$(BIN)/python benchmarks/run.py

clean: ## remove reports/ and caches (keeps .venv)
	rm -rf reports .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: help venv test report lab lint format bench clean
