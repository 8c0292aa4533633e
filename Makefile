# `make demo` and `make test` work as the first command on a fresh machine: each creates .venv and
# installs the project into it when missing (or when pyproject.toml changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m atkd.student.demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow'

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m bench.loss_speed
	$(PY) -m bench.signal_fidelity
	$(PY) -m bench.sparse_e2e
	$(PY) -m bench.teacher_throughput
	$(PY) -m bench.student_pipeline --steps 30 --rounds 2
	$(PY) -m bench.ray_throughput --rounds 7
