# CPA Scheduler — quick start: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck unit schema bench clean down reliability \
	reliability-long

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start the whole system locally on embedded defaults (Ctrl-C stops what it started).
run: install
	$(BIN)/cpa up

## Stop a detached `cpa up --detach`.
down: install
	$(BIN)/cpa down

lint: install
	$(BIN)/ruff check actors serve tests loadtests

typecheck: install
	$(BIN)/mypy

## Lint, type-check and run the suite without the slow scenarios (needs Redis on
## 127.0.0.1:6379; .ci/run starts one). `make reliability-long` runs the slow ones.
test: install lint typecheck
	$(BIN)/python -m pytest -m "not slow"

## Regenerate docs/lam.schema.json from the LAM models.
schema: install
	$(BIN)/python -m actors.lam > docs/lam.schema.json

bench: install
	$(BIN)/python loadtests/bench_foundation.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

## Run the fast fault-injection scenarios and refresh their rows of docs/reliability.md.
reliability: install
	CPA_RELIABILITY_REPORT=1 $(BIN)/python -m pytest -s -m "not slow" tests/test_e2e_faults.py tests/test_faults_agent.py tests/test_faults_outage.py tests/test_node_loss.py tests/test_deadlines.py
	CPA_RELIABILITY_REPORT=1 $(BIN)/python -m pytest -s tests/test_e2e_http.py tests/test_runtime_local.py -k "malformed or oversized or delayed_retry"

reliability-long: install
	CPA_RELIABILITY_REPORT=1 $(BIN)/python -m pytest -s -m slow tests/test_e2e_faults.py tests/test_faults_outage.py
