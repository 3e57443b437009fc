# syslog-relay. `make run` and `make test` do all set-up on Debian 12 as root.
SHELL := /bin/bash
VENV := .venv
VENV_DEBIAN := .venv-debian
PYTEST_ARGS ?=

.PHONY: setup setup-demo run test test-newest test-debian lint format bench deb clean

setup:
	@tools/setup.sh

# Only what the demo needs (no packaging tools, rsyslog or Debian venv).
setup-demo:
	@tools/setup.sh demo

run: setup-demo
	@tools/run-demo.sh

lint: setup
	$(VENV)/bin/ruff check relay archive tests
	$(VENV)/bin/ruff format --check relay archive tests
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format relay archive tests
	$(VENV)/bin/ruff check --fix relay archive tests

# Every test, on the newest PyPI releases and on Debian 12's own packages.
test: setup lint test-newest test-debian

test-newest: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Debian 12 has no duckdb or s3fs: the tests marked `query` run in test-newest only.
test-debian: setup
	$(VENV_DEBIAN)/bin/python -m pytest -m "not query" $(PYTEST_ARGS)

# Benchmark vs rsyslog and syslog-ng (docs/benchmarks.md). BENCH_ARGS="--quick" for a short run.
BENCH_ARGS ?=
bench: setup
	bench/setup.sh
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

# Debian package into dist/ (built from a copy of the tree; see packaging/).
deb:
	packaging/build-deb.sh dist

clean:
	rm -rf build dist .run .pytest_cache .mypy_cache .ruff_cache *.egg-info
