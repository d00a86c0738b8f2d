# Two commands on a fresh machine: `make run` (the tier under a demo load, embedded defaults)
# and `make test` (the whole suite against a real PostgreSQL and a real broker).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint bench bench-smoke clean

# PYTHONWARNINGS: setuptools announces every editable install with a warning that pip shows even
# with --quiet (the license is an SPDX string, so no deprecation warning remains).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m kaireon_pub.demo

test: $(STAMP)
	$(PY) -m ruff check kaireon_pub tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check kaireon_pub tests bench

# BENCH_ARGS, e.g. `make bench BENCH_ARGS="drain --database-url postgresql://…"`; see bench/README.md.
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .run
