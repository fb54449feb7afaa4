# encstate: two commands on a fresh machine.
#   make demo   sets everything up and shows the bot at work against a throwaway Synapse
#   make test   sets everything up and runs the whole test suite
# Installs are pinned by constraints.txt; `make lock` refreshes it on purpose.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
JS     := harness/js
JS_STAMP := $(JS)/node_modules/.installed
# `make build` needs only maubot's mbc: the one on PATH, else a venv with maubot alone.
BUILD_VENV := .venv-build
MBC := $(shell command -v mbc 2>/dev/null)
ifeq ($(MBC),)
MBC := $(BUILD_VENV)/bin/mbc
endif
LOCK_VENV := .venv-lock

.PHONY: venv js demo test unit lint format build lock bench clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -r requirements-dev.txt
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

$(BUILD_VENV)/bin/mbc: constraints.txt
	test -x $(BUILD_VENV)/bin/python || $(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/python -m pip install --quiet -c constraints.txt maubot
	touch $@

build: $(MBC)
	$(MBC) build -o encstate.mbp

# Refresh constraints.txt on purpose: the newest versions that requirements*.txt allow, installed
# into a scratch venv, frozen. Review the diff, run make test, commit it.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet -r requirements-dev.txt
	{ echo "# Exact versions of everything in a working dev venv (Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), Linux),"; \
	  echo "# from a fresh venv with requirements-dev.txt. make venv and make build install with"; \
	  echo "# -c constraints.txt. Refresh on purpose with make lock (it rewrites this file)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude pip --exclude encstate; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(BUILD_VENV) $(LOCK_VENV) $(JS)/node_modules encstate.mbp .pytest_cache .ruff_cache \
		build *.egg-info
