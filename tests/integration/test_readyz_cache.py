"""/readyz against a real PostgreSQL and broker opens no connection per request (issue 26): the
database's own count of sessions (pg_stat_database.sessions, read from another database) does not
move while the WSGI app answers /readyz 100 times in a second."""

from __future__ import annotations

import time
from wsgiref.util import setup_testing_defaults

import orjson
import psycopg

from kaireon_pub.http import readiness
from kaireon_pub.http.app import make_app
from kaireon_pub.settings import Settings
from tests.helpers import wait_for


def sessions(admin_url: str, database: str) -> int:
    """Sessions ever opened to `database` (counted by the server as each one is established)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (database,)).fetchone()
    return int(row[0]) if row else 0


def readyz(app) -> tuple[int, dict]:
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="GET", PATH_INFO="/readyz")
    seen: list[str] = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: seen.append(status)))
    return int(seen[0].split(" ", 1)[0]), orjson.loads(body)


def test_a_hundred_readyz_in_a_second_open_no_database_connection(pg, db_url, broker, tmp_path, monkeypatch):
    # The refresh clock is set past the test: every session counted below would be a probe's own.
    monkeypatch.setattr(readiness, "REFRESH_SECONDS", 3600.0)
    database = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    settings = Settings.from_env({"DATABASE_URL": db_url, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                                  "OUTBOX_LIVENESS_FILE": str(tmp_path / "alive")})
    app = make_app(settings)
    before_any = sessions(pg.admin_url, database)
    try:
        # The first answer waits for the first check: one session to the database.
        assert readyz(app) == (200, {"status": "ready", "checks": {"database": True, "broker": True}})
        wait_for(lambda: sessions(pg.admin_url, database) == before_any + 1, 10, "the first check's session")
        before = sessions(pg.admin_url, database)

        started = time.monotonic()
        answers = [readyz(app) for _ in range(100)]
        assert time.monotonic() - started < 1.0
        assert {status for status, _ in answers} == {200}

        # A session of our own as a marker: once it is counted, any probe's session would be too.
        psycopg.connect(db_url).close()
        wait_for(lambda: sessions(pg.admin_url, database) >= before + 1, 10, "the marker session counted")
        assert sessions(pg.admin_url, database) == before + 1
    finally:
        app.close()
