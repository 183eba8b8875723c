# Set-up is part of every target: a fresh machine needs only Python >= 3.10 and pip.
# torch is installed first and pinned, so that no later requirement pulls a different (e.g. CUDA) build.
# On other machines: make TORCH="torch" demo   (or any spec pip understands)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pyro-gpx-installed
DATA_DIR ?= ../shared/data
# tests run in one process per core (pytest-xdist), each with one torch thread (two workers with two threads
# each oversubscribe the cores): on 2 cores the suite takes 169 s, against 308 s in one process
TEST_WORKERS ?= auto

.PHONY: install demo test lint format bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pyro_gpx.demo --out demo_output

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	CI=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) tests pyro_gpx --doctest-modules
	CI=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --nbmake --nbmake-timeout=600 tutorials

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench-quick: $(STAMP)
	$(PY) benchmarks/bayes_regression.py --data-dir $(DATA_DIR) --quick --out benchmarks/results/bayes_regression_quick.json

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache .mypy_cache
