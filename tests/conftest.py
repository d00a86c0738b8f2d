"""Session-wide PostgreSQL and broker; a fresh database (from a migrated template) per test.

PostgreSQL is the embedded server unless KAIREON_TEST_DATABASE_URL names another one (e.g. the
machine's PostgreSQL 15: postgresql://postgres@127.0.0.1:5432/test). The broker is Tansu.

With KAIREON_TEST_VIA_PGBOUNCER=1 (or --via-pgbouncer), the tiers the e2e tests start reach the
test server through a real PgBouncer in pool_mode=transaction, one for the session (the Debian
package; every e2e test skips, with the reason, when it is not installed): `helpers.tier_env` gives
them its URL, OUTBOX_POOL_MODE=transaction and the direct URL as OUTBOX_LISTEN_DATABASE_URL; the
tests' own connections stay direct. `make test` runs the e2e suite a second time that way. A test
marked `not_via_pgbouncer("why")` is skipped then, with that reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from kaireon_pub.db.migrate import migrate
from tests import helpers
from tests import pgbouncer as pgbouncer_binary

TEMPLATE = f"kaireon_tpl_{uuid.uuid4().hex[:8]}"
VIA_PGBOUNCER = "KAIREON_TEST_VIA_PGBOUNCER"
E2E = os.path.join(os.path.dirname(__file__), "e2e") + os.sep


def pytest_addoption(parser) -> None:
    parser.addoption("--via-pgbouncer", action="store_true",
                     help=f"the e2e tests' tiers through a real PgBouncer in transaction mode (as {VIA_PGBOUNCER}=1)")


def via_pgbouncer(config) -> bool:
    return bool(config.getoption("via_pgbouncer")) or os.environ.get(VIA_PGBOUNCER, "") not in ("", "0")


def is_e2e(item) -> bool:
    return str(item.path).startswith(E2E)


def pytest_report_header(config) -> str | None:
    if not via_pgbouncer(config):
        return None
    if pgbouncer_binary.binary() is None:
        return f"{VIA_PGBOUNCER}: the e2e tests skip: {pgbouncer_binary.SKIP_REASON}"
    return f"{VIA_PGBOUNCER}: the e2e tests' tiers go through PgBouncer (pool_mode=transaction)"


def pytest_collection_modifyitems(config, items) -> None:
    if not via_pgbouncer(config):
        return
    missing = pgbouncer_binary.binary() is None
    for item in items:
        if not is_e2e(item):
            continue
        marker = item.get_closest_marker("not_via_pgbouncer")
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"{VIA_PGBOUNCER}: {pgbouncer_binary.SKIP_REASON}"))
        elif marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"not through PgBouncer: {marker.args[0]}"))


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


@pytest.fixture(scope="session")
def tier_pgbouncer(pg) -> Iterator[pgbouncer_binary.PgBouncer]:
    """The session's PgBouncer of KAIREON_TEST_VIA_PGBOUNCER: pool_mode=transaction, a pool of
    server connections per test database large enough for the largest test (four replicas of two
    workers, about three server connections per worker: README, "PgBouncer settings")."""
    bouncer = pgbouncer_binary.PgBouncer(pg.admin_url, pool_mode="transaction", pool_size=40)
    yield bouncer
    bouncer.stop()


@pytest.fixture(autouse=True)
def _tiers_via_pgbouncer(request, monkeypatch) -> None:
    if via_pgbouncer(request.config) and is_e2e(request.node):
        bouncer = request.getfixturevalue("tier_pgbouncer")
        monkeypatch.setattr(helpers, "TIER_POOLER", helpers.TierPooler(bouncer.port, bouncer.upstream_url))


@pytest.fixture
def db_url(pg) -> Iterator[str]:
    name = f"kaireon_t_{uuid.uuid4().hex[:10]}"
    url = pg.create_database(name, template=TEMPLATE)
    yield url
    pg.drop_database(name)


@pytest.fixture
def pdb_url(pg) -> Iterator[str]:
    """A fresh database made partitioned by `migrate` (OUTBOX_PARTITIONING=hourly)."""
    name = f"kaireon_p_{uuid.uuid4().hex[:10]}"
    url = pg.create_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, partitioning="hourly")
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
