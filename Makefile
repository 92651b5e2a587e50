# Everything runs from .venv; it is (re)built when setup.cfg changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The console's browser libraries (htmx, Mermaid, uPlot), from npm into an ignored folder that
# `saga console` serves (sagactl/console/assets.py); re-installed when the lock file changes.
ASSETS_DIR := .cache/console-assets
ASSETS_LOCK := sagactl/console/vendor/package-lock.json
ASSETS_STAMP := $(ASSETS_DIR)/.installed

.PHONY: install run-all test test-cluster test-unit test-integration test-e2e lint clean \
	node-deps console-assets browser

install: $(STAMP) $(ASSETS_STAMP)

$(STAMP): setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

# Node packages the document checks use (AsyncAPI JSON Schema, Mermaid parser), from scratch into
# the ignored .cache/node; the tests install them too when missing (tests/node_tools.py)
NODE_DIR := .cache/node
NODE_STAMP := $(NODE_DIR)/.installed

node-deps: $(NODE_STAMP)

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json tests/node/mermaid_parse.mjs
	mkdir -p $(NODE_DIR)
	cp tests/node/package.json tests/node/package-lock.json tests/node/mermaid_parse.mjs $(NODE_DIR)/
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	cp tests/node/package-lock.json $(NODE_STAMP)

$(ASSETS_STAMP): $(ASSETS_LOCK) sagactl/console/vendor/package.json
	mkdir -p $(ASSETS_DIR)
	cp sagactl/console/vendor/package.json $(ASSETS_LOCK) $(ASSETS_DIR)/
	npm ci --prefix $(ASSETS_DIR) --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $(ASSETS_STAMP)

console-assets: $(ASSETS_STAMP)

# Debian's chromium and chromedriver for the console's browser tests (apt-get as root; does
# nothing when both are there)
browser:
	.ci/install-chromium

run-all: $(STAMP) $(ASSETS_STAMP)
	$(BIN)/saga run-all

test: $(STAMP) $(ASSETS_STAMP) $(NODE_STAMP) browser
	$(BIN)/python -m pytest tests
	$(MAKE) test-cluster

# The stream, saga and operator CLI suites again, on a real 3-master Redis Cluster the tests
# start themselves
CLUSTER_SUITES := tests/integration/test_saga.py tests/integration/test_consumer.py \
	tests/integration/test_relay.py tests/integration/test_relay_drain.py \
	tests/integration/test_crashes.py \
	tests/integration/test_cli.py tests/integration/test_audit.py

test-cluster: $(STAMP)
	SAGA_TEST_REDIS_CLUSTER=1 $(BIN)/python -m pytest $(CLUSTER_SUITES)

test-unit: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration

test-e2e: $(STAMP) $(ASSETS_STAMP) browser
	$(BIN)/python -m pytest tests/e2e

# its own embedded servers unless the *_DATABASE_URL and REDIS_URL are set (saga bench --help);
# BENCH_ARGS passes options, e.g. make bench BENCH_ARGS='--only relay_drain'. The `bench` extra
# (FastStream, the consumer's yardstick) only here: install and test go without it
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e '.[test,bench]'
	touch $(BENCH_STAMP)

.PHONY: bench
bench: $(BENCH_STAMP)
	$(BIN)/saga bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# stop the embedded servers first: deleting their data under them would leave them orphaned
clean:
	if [ -x $(BIN)/saga ]; then $(BIN)/saga stack down; fi
	rm -rf .run .artifacts

# a look at the running system (the stack of `make run-all`, or the servers in the env vars)
.PHONY: streams outbox dead-letters

streams: $(STAMP)
	$(BIN)/saga streams

outbox: $(STAMP)
	$(BIN)/saga outbox

dead-letters: $(STAMP)
	$(BIN)/saga dead-letters list

# the invariants of DESIGN.md §3 on the running system; a soak under faults on temporary
# servers, then the audit (CHAOS_ARGS passes options, e.g. CHAOS_ARGS='--orders 100')
.PHONY: audit chaos

audit: $(STAMP)
	$(BIN)/saga audit

chaos: $(STAMP)
	$(BIN)/saga chaos $(CHAOS_ARGS)
