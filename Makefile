# encstate: two commands on a fresh machine.
#   make demo   sets everything up and shows the bot at work against a throwaway Synapse
#   make test   sets everything up and runs the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
JS     := harness/js
JS_STAMP := $(JS)/node_modules/.installed

.PHONY: venv js demo test unit lint format build bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# Element's client engine (matrix-js-sdk, Rust crypto) and the Node 22 it needs, for the tests
# that check room key bundles. Without npm those tests skip and say why.
$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	@if command -v npm >/dev/null; then \
		cd $(JS) && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: the matrix-js-sdk tests will skip"; fi

js: $(JS_STAMP)

demo: venv
	$(BIN)/python -m harness.demo

test: venv js
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
	# the integration suite again, every bot on PostgreSQL (skips, saying why, without one)
	$(BIN)/python -m pytest tests/integration --bot-database=postgres -m "not db_agnostic" -q

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
	rm -rf $(VENV) $(JS)/node_modules encstate.mbp .pytest_cache .ruff_cache
