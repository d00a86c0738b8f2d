# Two commands on a fresh machine: `make run` (the tier under a demo load, embedded defaults)
# and `make test` (the whole suite against a real PostgreSQL and a real broker).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test kafka-classpath lint bench bench-smoke clean

# PYTHONWARNINGS: setuptools announces every editable install with a warning that pip shows even
# with --quiet (the license is an SPDX string, so no deprecation warning remains).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# BROKER=kafka: the demo against a real Apache Kafka node (kaireon_pub/devkafka.py; Java 17 and Maven).
BROKER ?= tansu
run: $(STAMP)
	$(PY) -m kaireon_pub.demo --broker $(BROKER)

# Then the e2e suite a second time, every tier through a real PgBouncer in pool_mode=transaction
# (tests/conftest.py, KAIREON_TEST_VIA_PGBOUNCER), when Debian's pgbouncer is installed; and a third
# time against a real Apache Kafka node instead of Tansu (KAIREON_TEST_BROKER=kafka), when Java 17 and
# Maven (or the classpath they resolved, .cache/kafka/) are there.
# Each pass on two processes (pytest-xdist; TEST_PROCESSES=1 for one): the e2e tests mostly wait on
# the processes they start, so two share these 2 cores well (clean clones, README: the main pass
# 16.8 min on one process, 10.5 on two; through PgBouncer 9.5 and 5.2; against Kafka 4.1 and 2.5).
TEST_PROCESSES ?= 2
XDIST := -n $(TEST_PROCESSES) --dist loadgroup
test: $(STAMP)
	$(PY) -m ruff check kaireon_pub tests bench
	$(PY) -m pytest -q $(XDIST) --durations=15
	@if $(PY) -c 'from tests.pgbouncer import binary; raise SystemExit(binary() is None)'; then \
	  echo "The e2e suite again, the tiers through PgBouncer (pool_mode=transaction):"; \
	  KAIREON_TEST_VIA_PGBOUNCER=1 $(PY) -m pytest -q $(XDIST) tests/e2e; \
	else \
	  echo "SKIPPED the e2e suite through PgBouncer: pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)"; \
	fi
	@reason=$$($(PY) -c 'from kaireon_pub import devkafka; print(devkafka.unavailable() or "")'); \
	if [ -z "$$reason" ]; then \
	  echo "The e2e suite again, against Apache Kafka (one KRaft node; kaireon_pub/devkafka.py):"; \
	  start=$$(date +%s); KAIREON_TEST_BROKER=kafka $(PY) -m pytest -q $(XDIST) tests/e2e; rc=$$?; \
	  echo "The e2e suite against Apache Kafka took $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc; \
	else \
	  echo "SKIPPED the e2e suite against Apache Kafka: $$reason"; \
	fi

# The Kafka broker's classpath (kaireon_pub/devkafka.pom.xml), resolved by mvn into .cache/kafka/ once.
kafka-classpath: $(STAMP)
	$(PY) -m kaireon_pub.devkafka

lint: $(STAMP)
	$(PY) -m ruff check kaireon_pub tests bench

# BENCH_ARGS, e.g. `make bench BENCH_ARGS="drain --database-url postgresql://…"`; see bench/README.md.
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .run
