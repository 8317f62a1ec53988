# Every target does its own set-up on a fresh clone: the virtual environment,
# the locked dependencies, the Node test client, the migrations.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed
BENCH_NODE_STAMP := bench/node/node_modules/.installed

export DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/uvian_demo
export TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/uvian_test

.PHONY: install demo test lint typecheck unit bench chaos lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(NODE_STAMP): tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	touch $@

$(BENCH_NODE_STAMP): bench/node/package-lock.json
	npm ci --prefix bench/node --no-audit --no-fund --loglevel=error
	touch $@

demo: $(STAMP)
	$(BIN)/uvian-worker demo

lint: $(STAMP)
	$(BIN)/ruff check uvian_worker tests bench
	$(BIN)/ruff format --check uvian_worker tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) $(NODE_STAMP) lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP) $(BENCH_NODE_STAMP)
	$(BIN)/python -m bench.run_all

chaos: $(STAMP)
	$(BIN)/python -m bench.chaos

# Re-resolve the pinned dependencies (needs network access to PyPI).
lock:
	$(PYTHON) -m venv /tmp/uvian-lock-venv
	/tmp/uvian-lock-venv/bin/pip install --quiet pip-tools
	/tmp/uvian-lock-venv/bin/pip-compile --quiet --strip-extras --output-file requirements.lock pyproject.toml
	/tmp/uvian-lock-venv/bin/pip-compile --quiet --strip-extras --extra dev --output-file requirements-dev.lock pyproject.toml

clean:
	rm -rf $(VENV) tests/node/node_modules bench/node/node_modules .mypy_cache .ruff_cache .pytest_cache
