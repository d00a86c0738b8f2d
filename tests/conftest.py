"""Session-wide PostgreSQL and broker; a fresh database (from a migrated template) per test.

PostgreSQL is the embedded server unless KAIREON_TEST_DATABASE_URL names another one (e.g. the
machine's PostgreSQL 15: postgresql://postgres@127.0.0.1:5432/test). The broker is Tansu.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from kaireon_pub.db.migrate import migrate
from tests import helpers

TEMPLATE = f"kaireon_tpl_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def pg() -> Iterator[object]:
    from kaireon_pub.devenv import Postgres

    # Prepared transactions (two-phase commit) for the tests of the claim horizon; an external
    # server is used as configured (tests that need them skip when it has none).
    server = Postgres(settings={"max_prepared_transactions": "8"})
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    with psycopg.connect(server.url(TEMPLATE), autocommit=True) as conn:
        migrate(conn)
    yield server
    server.drop_database(TEMPLATE)
    server.stop()


@pytest.fixture
def db_url(pg) -> Iterator[str]:
    name = f"kaireon_t_{uuid.uuid4().hex[:10]}"
    url = pg.create_database(name, template=TEMPLATE)
    yield url
    pg.drop_database(name)


@pytest.fixture
def db(db_url) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def broker() -> Iterator[object]:
    from kaireon_pub.devenv import Broker

    b = Broker()
    yield b
    b.stop()


@pytest.fixture
def restartable_broker() -> Iterator[object]:
    """A broker of the test's own, for tests that stop or restart it."""
    from kaireon_pub.devenv import Broker

    b = Broker()
    yield b
    b.stop()


@pytest.fixture
def topic() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def tier_env(db_url, broker, tmp_path) -> dict[str, str]:
    return helpers.tier_env(db_url, broker.bootstrap, tmp_path)


@pytest.fixture(autouse=True)
def _no_stray_environment(monkeypatch):
    # Tests build their environment explicitly; the developer's shell must not leak in.
    for name in list(os.environ):
        if name.startswith(("OUTBOX_", "KAFKA_")) or name in ("CRON_SECRET", "DATABASE_URL"):
            monkeypatch.delenv(name)


@pytest.fixture
def run_tier(tmp_path) -> Iterator[object]:
    """Factory: run_tier(env) starts `kaireon-pub run`; every tier is killed at teardown."""
    started: list[helpers.Tier] = []

    def start(env: dict[str, str], name: str = "tier") -> helpers.Tier:
        tier = helpers.Tier(env, tmp_path / f"{name}-{len(started)}.log")
        started.append(tier)
        return tier

    yield start
    for tier in started:
        tier.kill()
