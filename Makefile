# `make demo` and `make test` work as the first command on a fresh machine: each creates .venv and installs
# what it needs into it when missing (or when pyproject.toml changed): the demo the runtime dependencies only,
# the tests the `dev` extra too (Ray Serve, pytest, ruff, grpcio-tools).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast lint bench install experiments experiments-quick

$(VENV)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-run
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.installed-report: $(VENV)/.installed-run
	$(PY) -m pip install --quiet -e '.[report]'
	touch $@

install: $(VENV)/.installed-dev

demo: $(VENV)/.installed-run
	$(PY) -m atkd.student.demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -m 'not slow'

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed-dev
	$(PY) -m bench.loss_speed
	$(PY) -m bench.signal_fidelity
	$(PY) -m bench.sparse_e2e
	$(PY) -m bench.teacher_throughput
	$(PY) -m bench.student_pipeline --steps 30 --rounds 2
	$(PY) -m bench.ray_throughput --rounds 7

experiments: $(VENV)/.installed-report
	$(PY) -m experiments

experiments-quick: $(VENV)/.installed-report
	$(PY) -m experiments --quick
