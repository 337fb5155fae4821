# memory-backfill: `make demo` to see it work, `make test` to test it.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip install --quiet --disable-pip-version-check

.PHONY: test lint demo zipapp size bench clean

$(VENV)/installed: requirements.txt tests/requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes --only-binary=:all: -r requirements.txt
	$(PIP) -r tests/requirements-dev.txt
	touch $@

test: lint
	$(VPY) -m pytest -q -n 2 tests

lint: $(VENV)/installed
	$(VPY) -m ruff check --target-version py310 --line-length 100 --select E,F,W,I,B,UP,BLE,S608 --ignore UP006,UP007,UP031,UP035,UP045 --per-file-ignores "tests/*:S608" .
	$(VPY) -m ruff format --check --target-version py310 --line-length 100 --config "format.quote-style='preserve'" .
	$(VENV)/bin/hadolint Dockerfile.tenant

demo: $(VENV)/installed
	$(VPY) tests/demo.py

zipapp: $(VENV)/installed
	PYTHON=$(VPY) ./build_zipapp.sh

size: zipapp
	$(VPY) bench/zipapp_budget.py dist/memory-backfill

clean:
	rm -rf dist .pytest_cache .ruff_cache tests/__pycache__ __pycache__ .hypothesis

bench: $(VENV)/installed
	$(VPY) bench/run.py --record
