# Two commands set up a fresh machine: `make demo` and `make test` (see README).
# Both create .venv if it is missing and install the project into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.skysense-installed
STAC_API_VENV := .venv-stac-api
DEMO_DIR ?= out/demo
DEMO_ARGS ?=
PYTEST_ARGS ?=
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo test stac-api browser clean help

help:
	@echo "make demo     install, then build the demo region and run the pipeline on it (out/demo)"
	@echo "make test     install, then run the whole test suite (starts its own pgstac STAC API)"
	@echo "make stac-api install PostgreSQL+PostGIS and the stac-fastapi-pgstac server venv"
	@echo "make browser  install headless Chromium + chromedriver (the report tests drive them)"
	@echo "make clean    remove generated outputs (out/)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

stac-api:
	bash infra/stac-api/install.sh $(STAC_API_VENV)

browser:
	bash infra/browser/install.sh

demo: install
	$(PY) jobs/demo.py --out $(DEMO_DIR) $(DEMO_ARGS)

test: install stac-api browser
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf out
