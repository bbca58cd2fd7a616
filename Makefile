# estd: the two commands a newcomer needs are `make run` and `make check`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO ?= demo
# twistd finds the `est` plugin in twisted/plugins/ of this checkout.
export PYTHONPATH := $(CURDIR)

.PHONY: run check test lint typecheck demo clean bench bench-smoke

$(BIN)/estctl: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/estctl

$(DEMO)/est.ini: | $(BIN)/estctl
	$(BIN)/estctl demo $(DEMO)

demo: $(DEMO)/est.ini

## make run: the server on a self-made demo PKI, in the foreground (Ctrl-C stops it)
run: $(DEMO)/est.ini
	$(BIN)/twistd -n est --config $(DEMO)/est.ini

## make check: everything CI runs: lint, types, tests
check: lint typecheck test

lint: $(BIN)/estctl
	$(BIN)/ruff check estd tests twisted bench
	$(BIN)/ruff format --check estd tests twisted bench

typecheck: $(BIN)/estctl
	$(BIN)/mypy

test: $(BIN)/estctl
	$(BIN)/pytest -q

## make bench: the standard benchmark matrix (about 10 minutes on 2 cores);
## results in bench/results/<timestamp>.json.  BENCH_ARGS adds options, e.g.
## make bench BENCH_ARGS='--duration 20'
bench: $(BIN)/estctl
	$(BIN)/python -m bench.driver --matrix $(BENCH_ARGS)

## make bench-smoke: a few seconds of every case; fails on any error
bench-smoke: $(BIN)/estctl
	$(BIN)/python -m bench.driver --smoke $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
