"""/readyz answers for the database and the broker: it flips when the broker stops and back, and
answers from the last check (refreshed every 5 s), so 100 probes in a second open no connection."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import psycopg

from tests import helpers


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_readyz_flips_with_the_broker(restartable_broker, start_tier):
    tier = start_tier(bootstrap=restartable_broker.bootstrap)
    port = tier.http_port()
    helpers.wait_for(lambda: readyz(port)[0] == 200, 30, "/readyz 200 with the broker up")
    assert readyz(port)[1] == {"status": "ready", "checks": {"database": True, "broker": True}}

    restartable_broker.stop()
    helpers.wait_for(lambda: readyz(port)[0] == 503, 30, "/readyz 503 with the broker stopped")
    assert readyz(port)[1]["checks"] == {"database": True, "broker": False}
    # Liveness is the file, not the broker: the pod is not restarted for a broker outage.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
        assert resp.status == 200

    restartable_broker.start()
    helpers.wait_for(lambda: readyz(port)[0] == 200, 60, "/readyz 200 once the broker is back")
    assert readyz(port)[1]["checks"] == {"database": True, "broker": True}
    assert tier.stop() == 0


def test_a_hundred_readyz_in_a_second_open_no_database_connection(pg, db_url, start_tier):
    """Against the real tier: 100 probes in a second add no session to the database beyond the
    tier's background (the readiness refresh's own, one every 5 s). Before, each probe opened one."""
    database = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]

    def sessions() -> int:
        with psycopg.connect(pg.admin_url, autocommit=True) as conn:  # another database: not counted
            return int(conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s",
                                    (database,)).fetchone()[0])

    tier = start_tier()
    port = tier.http_port()
    helpers.wait_for(lambda: readyz(port)[0] == 200, 30, "/readyz 200")
    before = sessions()
    started = time.monotonic()
    answers = [readyz(port)[0] for _ in range(100)]
    elapsed = time.monotonic() - started
    assert answers == [200] * 100 and elapsed < 5, elapsed
    opened = sessions() - before
    # One per probe would be 100. Allowed: the refresh that fell in the window (one per 5 s), one
    # counted late (a session is counted once established, a few ms after it was opened), and,
    # through a transaction pooler, the server sessions PgBouncer opens for the workers' own ticks
    # while the just-started tier's concurrency grows (CI: 3 in 0.11 s, none of them a probe's).
    assert opened < 10, opened
    assert tier.stop() == 0
