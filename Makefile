# encstate: two commands on a fresh machine.
#   make demo   sets everything up and shows the bot at work against a throwaway Synapse
#   make test   sets everything up and runs the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test unit lint format build bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m harness.demo

test: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
	# the integration suite again, every bot on PostgreSQL (skips, saying why, without one)
	$(BIN)/python -m pytest tests/integration --bot-database=postgres -q

unit: venv
	$(BIN)/python -m pytest tests/unit tests/plugin

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

build: venv
	$(BIN)/mbc build -o encstate.mbp

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) encstate.mbp .pytest_cache .ruff_cache
