"""Session-wide PostgreSQL and broker; a fresh database (from a migrated template) per test.

PostgreSQL is the embedded server unless KAIREON_TEST_DATABASE_URL names another one (e.g. the
machine's PostgreSQL 15: postgresql://postgres@127.0.0.1:5432/test). The broker is Tansu.

With KAIREON_TEST_VIA_PGBOUNCER=1 (or --via-pgbouncer), the tiers the e2e tests start reach the
test server through a real PgBouncer in pool_mode=transaction, one for the session (the Debian
package; every e2e test skips, with the reason, when it is not installed): `helpers.tier_env` gives
them its URL, OUTBOX_POOL_MODE=transaction and the direct URL as OUTBOX_LISTEN_DATABASE_URL; the
tests' own connections stay direct. `make test` runs the e2e suite a second time that way. A test
marked `not_via_pgbouncer("why")` is skipped then, with that reason, and so is an e2e test of Kafka's
own clusters (`kafka_cluster`, `kafka_sasl`: broker faults, not the database path).

With KAIREON_TEST_BROKER=kafka (or --broker=kafka), the session's `broker` and `restartable_broker`
are a real Apache Kafka 4.4 node (kaireon_pub.devkafka.KafkaBroker: KRaft, a JVM of its own) instead
of Tansu, with the same surface; as Tansu's, a Kafka `start()` after `stop()` (and `restart()`) comes
back empty. A test marked `tansu_only("why")` is skipped then, with that reason, and so is an e2e test
whose broker is not the session's (OWN_BROKERS: it ran the same in the first pass) or one marked
`broker_agnostic("why")` (the database path, the processes: what it proves is not the broker's);
`make test` runs the e2e suite a third time that way. Whichever the broker, `kafka_cluster` (three
Kafka nodes, replication factor 3, min.insync.replicas=2) and `kafka_sasl` (one node with a SASL_SSL
listener, SCRAM-SHA-512 over TLS) are session fixtures; every Kafka fixture skips, with the reason,
without Java or Maven.

`make test` runs each pass with pytest-xdist on two processes (`-n 2 --dist loadgroup`): each
process has its own session PostgreSQL and broker; a module's tests stay on one process, and the
tests of Kafka's own clusters on one (group_for_xdist), so those JVMs start once.
"""

from __future__ import annotations

import os
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from kaireon_pub.db.migrate import migrate
from tests import helpers
from tests import pgbouncer as pgbouncer_binary

TEMPLATE = f"kaireon_tpl_{uuid.uuid4().hex[:8]}"
VIA_PGBOUNCER = "KAIREON_TEST_VIA_PGBOUNCER"
TEST_BROKER = "KAIREON_TEST_BROKER"
BROKERS = ("tansu", "kafka")
E2E = os.path.join(os.path.dirname(__file__), "e2e") + os.sep


def pytest_addoption(parser) -> None:
    parser.addoption("--via-pgbouncer", action="store_true",
                     help=f"the e2e tests' tiers through a real PgBouncer in transaction mode (as {VIA_PGBOUNCER}=1)")
    parser.addoption("--broker", choices=BROKERS, default=None,
                     help=f"the session's broker: tansu (the default) or a real Apache Kafka (as {TEST_BROKER}=kafka)")


def via_pgbouncer(config) -> bool:
    return bool(config.getoption("via_pgbouncer")) or os.environ.get(VIA_PGBOUNCER, "") not in ("", "0")


def broker_kind(config) -> str:
    kind = config.getoption("broker") or os.environ.get(TEST_BROKER, "").strip().lower() or "tansu"
    if kind not in BROKERS:
        raise pytest.UsageError(f"{TEST_BROKER}={kind!r}: one of {', '.join(BROKERS)}")
    return kind


def pytest_configure(config) -> None:
    # The chosen broker, for what a test starts by itself (the demo of test_make_run: --broker).
    os.environ[TEST_BROKER] = broker_kind(config)


def is_e2e(item) -> bool:
    return str(item.path).startswith(E2E)


def pytest_report_header(config) -> list[str]:
    lines = []
    if broker_kind(config) == "kafka":
        from kaireon_pub import devkafka

        reason = devkafka.unavailable()
        lines.append(f"{TEST_BROKER}=kafka: " + (f"the tests that need a broker skip: {reason}" if reason else
                     f"the session's broker is Apache Kafka {devkafka.KAFKA_VERSION} (one KRaft node)"))
    if via_pgbouncer(config):
        if pgbouncer_binary.binary() is None:
            lines.append(f"{VIA_PGBOUNCER}: the e2e tests skip: {pgbouncer_binary.SKIP_REASON}")
        else:
            lines.append(f"{VIA_PGBOUNCER}: the e2e tests' tiers go through PgBouncer (pool_mode=transaction)")
    return lines


# Fixtures of a broker that is not the session's: a test using one runs the same whichever the session's
# broker is, so the Kafka pass leaves it to the first (Kafka's own clusters; tests/faults.FaultBroker, Tansu).
KAFKA_CLUSTERS = ("kafka_cluster", "kafka_sasl")
# kafka_broker: a real Kafka in every pass already, so the Kafka pass would only run it again.
OWN_BROKERS = (*KAFKA_CLUSTERS, "kafka_broker", "proxied_broker", "fault_broker")


def pytest_collection_modifyitems(config, items) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        group_for_xdist(items)
    if broker_kind(config) == "kafka":
        for item in items:
            marker = item.get_closest_marker("tansu_only")
            agnostic = item.get_closest_marker("broker_agnostic")
            own = [name for name in OWN_BROKERS if name in getattr(item, "fixturenames", ())]
            if marker is not None:
                item.add_marker(pytest.mark.skip(reason=f"Tansu only: {marker.args[0]}"))
            elif agnostic is not None and is_e2e(item):
                # What it proves does not depend on the broker: the pass would only repeat the first
                # one's run (make test stays within its 35 minutes).
                item.add_marker(pytest.mark.skip(
                    reason=f"ran in the first pass, whatever the broker: {agnostic.args[0]}"))
            elif own and is_e2e(item):
                item.add_marker(pytest.mark.skip(
                    reason=f"the same as in the first pass: its broker is {own[0]}, not the session's"))
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
        elif any(name in getattr(item, "fixturenames", ()) for name in KAFKA_CLUSTERS):
            # Minutes of broker faults each, about the broker path; the database path through PgBouncer
            # is the other tests' (make test stays within its 35 minutes).
            item.add_marker(pytest.mark.skip(reason="not through PgBouncer: a fault test of Kafka's own "
                                             "cluster, about the broker path; ran in the first pass"))


def group_for_xdist(items) -> None:
    """Under pytest-xdist (`-n N --dist loadgroup`): a module's tests on one process (its module-scoped
    fixtures made once), and every test of Kafka's own clusters on one process, so that only one
    process starts those JVMs. Without `-n` the marker does nothing."""
    for item in items:
        uses_cluster = any(name in getattr(item, "fixturenames", ()) for name in OWN_BROKERS[:3])
        item.add_marker(pytest.mark.xdist_group("kafka-clusters" if uses_cluster else item.module.__name__))


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


def _kafka_or_skip() -> None:
    from kaireon_pub import devkafka

    reason = devkafka.unavailable()
    if reason is not None:
        pytest.skip(f"no Apache Kafka here: {reason}")


def _broker(request, workdir) -> Iterator[object]:
    """Tansu, or one Kafka node under KAIREON_TEST_BROKER=kafka; stopped at the end either way."""
    if broker_kind(request.config) == "kafka":
        from kaireon_pub.devkafka import KafkaBroker

        _kafka_or_skip()
        b = KafkaBroker(workdir)
        yield b
        b.close()
        return
    from kaireon_pub.devenv import Broker

    b = Broker()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def kafka_logs() -> Path:
    """The session's Kafka work directories (data removed at their stop, server.log kept): outside
    pytest's basetemp, which later sessions on the machine prune while this one may still read it."""
    return Path(tempfile.mkdtemp(prefix="kaireon-kafka-"))


@pytest.fixture(scope="session")
def broker(request, kafka_logs) -> Iterator[object]:
    yield from _broker(request, kafka_logs / "broker")


@pytest.fixture
def restartable_broker(request, kafka_logs) -> Iterator[object]:
    """A broker of the test's own, for tests that stop, freeze or restart it. With Kafka, the
    session's node (a JVM starts in 10-20 s on a loaded machine): stopped, it comes back empty,
    as a Tansu of the test's own would be; thawed and started again, if need be, when the test ends."""
    if broker_kind(request.config) != "kafka":
        yield from _broker(request, kafka_logs)
        return
    b = request.getfixturevalue("broker")
    yield b
    if b.process is not None and b.process.poll() is None:
        os.kill(b.process.pid, signal.SIGCONT)
    else:
        b.start()


@pytest.fixture(scope="session")
def kafka_cluster(kafka_logs) -> Iterator[object]:
    """Three Kafka nodes (KRaft, each a controller and a broker): replication factor 3,
    min.insync.replicas=2. A test that stops or kills a node starts it again before it ends."""
    from kaireon_pub.devkafka import KafkaCluster

    _kafka_or_skip()
    cluster = KafkaCluster(3, workdir=kafka_logs / "cluster")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def kafka_sasl(kafka_logs) -> Iterator[object]:
    """One Kafka node with a PLAINTEXT and a SASL_SSL listener (SCRAM-SHA-512 over TLS, the CA in
    `ca_file`, the users and their passwords in `users`; `sasl_client_config(user)`)."""
    from kaireon_pub.devkafka import KafkaCluster

    _kafka_or_skip()
    cluster = KafkaCluster(1, sasl_ssl=True, workdir=kafka_logs / "sasl")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def kafka_broker(request) -> object:
    """A real Apache Kafka whatever the pass: the session's node under KAIREON_TEST_BROKER=kafka,
    else `kafka_cluster` (already started for the failover tests; no JVM more). For tests whose
    claim rests on a real broker's offsets (the audit, locate, replay): Tansu's are not true."""
    if broker_kind(request.config) == "kafka":
        return request.getfixturevalue("broker")
    return request.getfixturevalue("kafka_cluster")


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
