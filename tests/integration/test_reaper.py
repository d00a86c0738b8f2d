"""The reaper against a real PostgreSQL: the bulk reset, concurrency, the staleness fallback, the
HTTP route through the real server, the CLI, the HTTP child process, and secrets never leaking."""

from __future__ import annotations

import http.client
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import psycopg
import pytest

from kaireon_pub import logs, reaper
from kaireon_pub.http.app import CRON_PATH, make_app
from kaireon_pub.http.server import serve_forever
from kaireon_pub.reaper import RESULT_KEYS
from kaireon_pub.settings import Settings
from tests.helpers import run_cli, tier_env, wait_for

SECRET = "cron-SENTINEL-" + uuid.uuid4().hex
PASSWORD = "pw-SENTINEL-" + uuid.uuid4().hex
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def make_settings(db_url: str, tmp_path, **env: str) -> Settings:
    base = {"DATABASE_URL": db_url, "CRON_SECRET": SECRET, "OUTBOX_HTTP_HOST": "127.0.0.1",
            "OUTBOX_HTTP_PORT": "0", "OUTBOX_LIVENESS_FILE": str(tmp_path / "alive")}
    base.update(env)
    return Settings.from_env({k: v for k, v in base.items() if v is not None}, need_kafka=False)


def insert(db: psycopg.Connection, status: str, age: str, n: int = 1) -> list[int]:
    """n rows of `status` whose updated_at is `age` before the database's now (backdated, not slept)."""
    claimed = status == "processing"
    rows = db.execute(
        """INSERT INTO outbox_events (topic, partition_key, payload, status, claim_token, claimed_by, updated_at)
           SELECT 'reaper-test', 'k' || g, '{"n": 1}'::jsonb, %(status)s,
                  CASE WHEN %(claimed)s THEN gen_random_uuid() END,
                  CASE WHEN %(claimed)s THEN gen_random_uuid() END,
                  clock_timestamp() - %(age)s::interval
           FROM generate_series(1, %(n)s) g RETURNING id""",
        {"status": status, "claimed": claimed, "age": age, "n": n},
    ).fetchall()
    return [r[0] for r in rows]


def rows(db: psycopg.Connection, ids: list[int]) -> list[tuple]:
    return db.execute(
        "SELECT status, claim_token IS NULL, claimed_by IS NULL, updated_at FROM outbox_events "
        "WHERE id = ANY(%s) ORDER BY id", (ids,)).fetchall()


def statuses(db: psycopg.Connection, ids: list[int]) -> set[str]:
    return {r[0] for r in rows(db, ids)}


def assert_result(result: dict, reset_count: int, staleness: int = 300) -> None:
    assert list(result) == list(RESULT_KEYS)
    assert result["status"] == "ok"
    assert result["stalenessSeconds"] == staleness
    assert result["resetCount"] == reset_count
    assert isinstance(result["durationMs"], int) and result["durationMs"] >= 0
    assert TIMESTAMP.fullmatch(result["timestamp"])


# ---- the reset ---------------------------------------------------------------------------------

def test_stale_processing_rows_go_back_to_pending_and_fresh_ones_stay(db, db_url, tmp_path):
    settings = make_settings(db_url, tmp_path)
    stale = insert(db, "processing", "10 minutes", 3) + insert(db, "processing", "301 seconds")
    fresh = insert(db, "processing", "299 seconds") + insert(db, "processing", "0 seconds", 2)
    others = insert(db, "pending", "1 day") + insert(db, "published", "1 day") + insert(db, "failed", "1 day")
    fresh_before, others_before = rows(db, fresh), rows(db, others)
    db.execute("LISTEN kaireon_outbox_rescan")

    result = reaper.reap(settings, source="test")

    assert_result(result, reset_count=4)
    assert all(r[:3] == ("pending", True, True) for r in rows(db, stale))  # claim cleared
    assert rows(db, fresh) == fresh_before  # token, owner and updated_at untouched
    assert rows(db, others) == others_before
    # The workers are told to rescan behind their cursors.
    notes = list(db.notifies(timeout=10, stop_after=1))
    assert [n.channel for n in notes] == ["kaireon_outbox_rescan"]

    second = reaper.reap(settings, source="test")
    assert_result(second, reset_count=0)
    # No rescan for an empty run: a marker NOTIFY sent after it arrives first (commit order).
    with psycopg.connect(db_url, autocommit=True) as other:
        db.execute("LISTEN marker")
        other.execute("NOTIFY marker")
    notes = list(db.notifies(timeout=10, stop_after=1))
    assert [n.channel for n in notes] == ["marker"]

    runs = db.execute("SELECT source, reset_count, duration_ms >= 0 FROM outbox_reaper_runs ORDER BY id").fetchall()
    assert runs == [("test", 4, True), ("test", 0, True)]


def test_concurrent_runs_reset_each_stale_row_exactly_once(db, db_url, tmp_path):
    """10 runs, each on its own connection, all inside their UPDATE at the same moment.

    A transaction holds the stale rows' locks until all 10 UPDATEs are seen waiting on them in
    pg_stat_activity; then it lets go. The process lock is bypassed (run_once) so the database
    alone must keep the runs from resetting a row twice.
    """
    settings = make_settings(db_url, tmp_path)
    stale = insert(db, "processing", "1 hour", 25)
    results: list[dict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(reaper.run_once(settings, source="test"))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(10)]
    with psycopg.connect(db_url) as blocker:
        blocker.execute("SELECT id FROM outbox_events WHERE id = ANY(%s) FOR UPDATE", (stale,))
        try:
            for t in threads:
                t.start()
            wait_for(lambda: db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'kaireon-pub:reaper' AND wait_event_type = 'Lock'"
            ).fetchone()[0] == 10, timeout=20, what="10 reaper UPDATEs waiting on the row locks")
        finally:
            blocker.rollback()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sum(r["resetCount"] for r in results) == len(stale)
    assert statuses(db, stale) == {"pending"}
    assert db.execute("SELECT count(*), sum(reset_count) FROM outbox_reaper_runs").fetchone() == (10, 25)


def test_concurrent_reap_calls_in_one_process_are_single_flight(db, db_url, tmp_path, monkeypatch):
    settings = make_settings(db_url, tmp_path)
    stale = insert(db, "processing", "1 hour", 10)
    barrier = threading.Barrier(10)
    results: list[dict] = []
    in_flight, most = [0], [0]
    counter_lock = threading.Lock()
    real_run_once = reaper.run_once

    def counting_run_once(*args, **kwargs):
        with counter_lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            return real_run_once(*args, **kwargs)
        finally:
            with counter_lock:
                in_flight[0] -= 1

    monkeypatch.setattr(reaper, "run_once", counting_run_once)

    def run() -> None:
        barrier.wait(timeout=10)
        results.append(reaper.reap(settings, source="test"))

    threads = [threading.Thread(target=run) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 10
    assert most[0] == 1  # never two runs at once in this process
    assert sorted(r["resetCount"] for r in results) == [0] * 9 + [10]
    assert statuses(db, stale) == {"pending"}


@pytest.mark.parametrize("value", ["abc", "0", "-5", "", " ", "1.5"])
def test_invalid_staleness_falls_back_to_300_with_a_warning(value, db, db_url, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    settings = make_settings(db_url, tmp_path, OUTBOX_REAPER_STALENESS_SECONDS=value)
    assert settings.reaper_staleness_seconds == 300
    settings.log_warnings()
    warned = [r for r in caplog.records if getattr(r, "event", None) == "config fallback"]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    assert "OUTBOX_REAPER_STALENESS_SECONDS" in warned[0].getMessage()

    stale, fresh = insert(db, "processing", "301 seconds"), insert(db, "processing", "299 seconds")
    assert_result(reaper.reap(settings, source="test"), reset_count=1)
    assert (statuses(db, stale), statuses(db, fresh)) == ({"pending"}, {"processing"})


def test_a_valid_staleness_is_used(db, db_url, tmp_path):
    settings = make_settings(db_url, tmp_path, OUTBOX_REAPER_STALENESS_SECONDS="120")
    assert settings.warnings == ()
    stale, fresh = insert(db, "processing", "121 seconds"), insert(db, "processing", "119 seconds")
    assert_result(reaper.reap(settings, source="test"), reset_count=1, staleness=120)
    assert (statuses(db, stale), statuses(db, fresh)) == ({"pending"}, {"processing"})


# ---- the CLI -----------------------------------------------------------------------------------

def test_cli_reap_prints_the_json_and_its_metrics_reach_the_tier(db, db_url, tmp_path):
    stale = insert(db, "processing", "1 hour", 2)
    env = tier_env(db_url, "", tmp_path, OUTBOX_REAPER_STALENESS_SECONDS="abc")
    assert not os.path.exists(env["PROMETHEUS_MULTIPROC_DIR"])

    done = run_cli("reap", env=env)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert_result(orjson.loads(lines[0]), reset_count=2)
    assert statuses(db, stale) == {"pending"}
    logged = [orjson.loads(line) for line in done.stderr.splitlines()]
    assert any(e["level"] == "WARNING" and e.get("event") == "config fallback" for e in logged)
    assert any(e.get("event") == "reaper run" and e["resetCount"] == 2 and e["source"] == "cli" for e in logged)

    # The CLI wrote multiprocess metric files; the tier's /metrics reads that directory.
    settings = make_settings(db_url, tmp_path, PROMETHEUS_MULTIPROC_DIR=env["PROMETHEUS_MULTIPROC_DIR"])
    status, headers, body = wsgi_get(make_app(settings, readiness=lambda: {}), "/metrics")
    text = body.decode()
    assert status.startswith("200")
    assert 'kaireon_outbox_reaper_runs_total{source="cli"} 1.0' in text
    assert "kaireon_outbox_reaper_reset_total 2.0" in text


def wsgi_get(app, path: str) -> tuple[str, dict, bytes]:
    from wsgiref.util import setup_testing_defaults

    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD="GET")
    captured: dict = {}
    body = b"".join(app(environ, lambda s, h, e=None: captured.update(status=s, headers=dict(h))))
    return captured["status"], captured["headers"], body


# ---- the HTTP route through the real server ----------------------------------------------------

@contextmanager
def running_server(settings: Settings, caplog=None) -> Iterator[str]:
    """serve_forever in a thread on a free port; yields the base URL; stops and joins it."""
    stop = threading.Event()
    bound: list[int] = []
    listening = threading.Event()
    failed: list[BaseException] = []

    def ready(port: int) -> None:
        bound.append(port)
        listening.set()

    def serve() -> None:
        try:
            serve_forever(settings, stop, ready)
        except BaseException as exc:
            failed.append(exc)
            listening.set()

    thread = threading.Thread(target=serve, name="test-http")
    thread.start()
    try:
        assert listening.wait(10), "the server did not report its port"
        assert not failed, failed
        yield f"http://127.0.0.1:{bound[0]}"
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "serve_forever did not return after stop_event"


def request(url: str, method: str = "GET", headers: dict | None = None,
            data: bytes | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def raw_request(base: str, headers: list[tuple[str, bytes]]) -> tuple[int, bytes]:
    """http.client with header values given as bytes (urllib insists on latin-1 text)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", CRON_PATH)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_cron_route_end_to_end(db, db_url, tmp_path):
    stale = insert(db, "processing", "1 hour", 3)
    settings = make_settings(db_url, tmp_path)
    with running_server(settings) as base:
        url = base + CRON_PATH
        # GET, HEAD and OPTIONS never reset rows, even with the right secret.
        for method in ("GET", "HEAD", "OPTIONS"):
            status, headers, _ = request(url, method, {"Authorization": f"Bearer {SECRET}"})
            assert (status, headers["Allow"]) == (405, "POST")
        status, _, body = request(url, "POST", headers={"Authorization": "Bearer wrong"})
        assert (status, body) == (401, b'{"error":"unauthorized"}')
        status, _, body = request(url, "POST", {"x-cron-secret": SECRET}, data=b"x" * 2048)
        assert status == 413
        assert statuses(db, stale) == {"processing"}

        status, headers, body = request(url, "POST", headers={"Authorization": f"Bearer {SECRET}"})
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert set(orjson.loads(body)) == set(RESULT_KEYS)
        assert_result(orjson.loads(body), reset_count=3)
        assert statuses(db, stale) == {"pending"}

        status, _, body = request(url, "POST", {"x-cron-secret": SECRET}, data=b"{}")
        assert status == 200 and orjson.loads(body)["resetCount"] == 0
        # Non-ASCII bytes on the wire are a 401, not a 500.
        assert raw_request(base, [("x-cron-secret", "秘密".encode())])[0] == 401
        assert request(base + "/nope")[0] == 404


def test_a_second_run_while_one_is_in_flight_is_429_with_retry_after(db, db_url, tmp_path):
    """One run at a time per HTTP process: the first run is held by a row lock of another session
    (its UPDATE waits for it); a second authenticated call is answered at once, not parked."""
    stale = insert(db, "processing", "1 hour", 2)
    settings = make_settings(db_url, tmp_path)
    auth = {"Authorization": f"Bearer {SECRET}"}
    with running_server(settings) as base, psycopg.connect(db_url) as holder:
        holder.execute("SELECT 1 FROM outbox_events WHERE id = %s FOR UPDATE", (stale[0],))
        first: list[tuple[int, dict, bytes]] = []
        thread = threading.Thread(target=lambda: first.append(request(base + CRON_PATH, "POST", auth)))
        thread.start()
        try:
            wait_for(lambda: db.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND datname = current_database()").fetchone()[0] == 1,
                     10, "the first run waiting on the row lock")
            status, headers, body = request(base + CRON_PATH, "POST", auth)
            assert (status, headers["Retry-After"], orjson.loads(body)) == (
                429, "5", {"error": "a reaper run is in flight"})
            # Not authenticated: a 401 first, whatever is in flight.
            assert request(base + CRON_PATH, "POST", {"Authorization": "Bearer wrong"})[0] == 401
            assert statuses(db, stale) == {"processing"}
        finally:
            holder.rollback()
            thread.join(30)
        assert first[0][0] == 200 and orjson.loads(first[0][2])["resetCount"] == 2
        # The run is over: the next call runs.
        assert request(base + CRON_PATH, "POST", auth)[0] == 200


def test_non_ascii_secret_is_compared_on_its_bytes(db_url, tmp_path):
    secret = "sécret-ü-" + uuid.uuid4().hex
    settings = make_settings(db_url, tmp_path, CRON_SECRET=secret)
    with running_server(settings) as base:
        assert raw_request(base, [("x-cron-secret", secret.encode("utf-8"))])[0] == 200
        assert raw_request(base, [("x-cron-secret", secret.encode("latin-1"))])[0] == 401


def test_readyz_default_checks_database_and_broker(db_url, tmp_path, broker):
    up = make_settings(db_url, tmp_path, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap)
    with running_server(up) as base:
        status, _, body = request(base + "/readyz")
        assert (status, orjson.loads(body)) == (200, {"status": "ready", "checks": {"database": True, "broker": True}})
    down = make_settings(db_url, tmp_path, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
                         DATABASE_URL=psycopg.conninfo.make_conninfo(db_url, dbname="kaireon_missing"))
    with running_server(down) as base:
        status, _, body = request(base + "/readyz")
        assert (status, orjson.loads(body)["checks"]) == (503, {"database": False, "broker": True})


# ---- secrets never leak ------------------------------------------------------------------------

def test_no_log_line_response_or_error_contains_the_secrets(db, db_url, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    good_url = psycopg.conninfo.make_conninfo(db_url, password=PASSWORD)  # trust auth ignores it
    bad_url = psycopg.conninfo.make_conninfo(db_url, dbname="kaireon_missing_db", password=PASSWORD)
    insert(db, "processing", "1 hour")
    seen: list[bytes] = []

    def exercise(settings: Settings, expect_reaper: int) -> None:
        with running_server(settings) as base:
            url = base + CRON_PATH
            for headers in ({"Authorization": f"Bearer {SECRET}"}, {"x-cron-secret": SECRET},
                            {"Authorization": "Bearer wrong"}, {"x-cron-secret": SECRET[:-1]},
                            {"Authorization": f"Bearer {SECRET}", "x-cron-secret": "wrong"},
                            {"Authorization": "Bearer None"}, {}):
                status, headers_out, body = request(url, "POST", headers)
                seen.extend([body, repr(headers_out).encode()])
                if headers == {"x-cron-secret": SECRET}:
                    assert status == expect_reaper
            # The secret where the app never looks for it: query string and path.
            for path in (f"{CRON_PATH}?secret={SECRET}", f"/{SECRET}", f"/x?db={PASSWORD}"):
                seen.append(request(base + path)[2])
            seen.append(request(base + "/readyz")[2])

    exercise(make_settings(good_url, tmp_path), 200)
    exercise(make_settings(good_url, tmp_path, CRON_SECRET=None), 401)
    exercise(make_settings(bad_url, tmp_path), 500)

    env = tier_env(bad_url, "", tmp_path, CRON_SECRET=SECRET)
    failed = run_cli("reap", env=env)
    assert failed.returncode == 1
    error_lines = [orjson.loads(line) for line in failed.stderr.splitlines()]
    assert any(e.get("event") == "reaper failed" and e.get("errorId") for e in error_lines)
    seen.extend([failed.stdout.encode(), failed.stderr.encode()])

    formatter = logs.JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    assert any('"reaper failed"' in line for line in lines)  # the failing database was exercised
    assert any('"status":401' in line for line in lines)
    for text in [*lines, *(b.decode("utf-8", "replace") for b in seen)]:
        assert SECRET not in text
        assert PASSWORD not in text


# ---- the HTTP child process --------------------------------------------------------------------

CHILD = """
import sys
from kaireon_pub import logs
from kaireon_pub.settings import Settings
from kaireon_pub.http.server import http_child_main
logs.configure("INFO")
sys.exit(http_child_main(Settings.from_env(need_kafka=False), int(sys.argv[1])))
"""


def start_child(env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(write_fd)], env=env, pass_fds=(write_fd,),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(write_fd)
    return proc, read_fd


def read_port_report(fd: int, timeout: float) -> bytes:
    """Everything written to the pipe until the child closes it (bounded)."""
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no port report within {timeout} s"
        chunk = os.read(fd, 64)
        if not chunk:
            return data
        data += chunk


def test_http_child_reports_its_port_serves_and_stops_on_sigterm(db_url, tmp_path):
    env = tier_env(db_url, "", tmp_path, CRON_SECRET=SECRET, OUTBOX_HTTP_HOST="127.0.0.1")
    (tmp_path / "alive").touch()
    proc, fd = start_child(env)
    try:
        report = read_port_report(fd, timeout=30)
        assert re.fullmatch(rb"\d+\n", report), report
        base = f"http://127.0.0.1:{int(report)}"
        assert request(base + "/healthz")[0] == 200
        assert request(base + CRON_PATH, "POST", headers={"x-cron-secret": SECRET})[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        os.close(fd)
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=15)
        print(stderr)  # shown by pytest when the test fails
    logged = [orjson.loads(line) for line in stderr.splitlines()]
    assert {e["role"] for e in logged} == {"http"}
    assert [e["event"] for e in logged if e.get("event") in ("http listening", "http stopped")] == \
        ["http listening", "http stopped"]
    assert SECRET not in stderr


def test_http_child_that_cannot_bind_exits_4_and_closes_the_fd(tmp_path, db_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = tier_env(db_url, "", tmp_path, OUTBOX_HTTP_HOST="127.0.0.1", OUTBOX_HTTP_PORT=str(port))
        proc, fd = start_child(env)
        try:
            assert read_port_report(fd, timeout=30) == b""
            assert proc.wait(timeout=15) == 4
        finally:
            os.close(fd)
            if proc.poll() is None:
                proc.kill()
            _, stderr = proc.communicate(timeout=15)
            print(stderr)
    failure = [orjson.loads(line) for line in stderr.splitlines() if '"http boot failed"' in line]
    assert len(failure) == 1 and failure[0]["errorId"]


def test_call_reaper_command_against_the_tier_route(db, db_url, tmp_path):
    """`kaireon-pub call-reaper` (the CronJob's command) resets rows through the real route."""
    stale = insert(db, "processing", "1 hour", 2)
    settings = make_settings(db_url, tmp_path)
    base_env = {k: v for k, v in os.environ.items() if k not in ("CRON_SECRET", "DATABASE_URL")}
    with running_server(settings) as base:
        url = base + CRON_PATH
        done = subprocess.run([sys.executable, "-m", "kaireon_pub", "call-reaper", "--url", url],
                              env={**base_env, "CRON_SECRET": SECRET}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert_result(orjson.loads(done.stdout), reset_count=2)
        assert statuses(db, stale) == {"pending"}
        wrong = subprocess.run([sys.executable, "-m", "kaireon_pub", "call-reaper", "--url", url],
                               env={**base_env, "CRON_SECRET": "not-the-secret"}, capture_output=True, text=True,
                               timeout=60)
    assert wrong.returncode == 1
    assert "answered HTTP 401" in wrong.stderr and "not retried after 1 attempt" in wrong.stderr
    assert SECRET not in done.stdout + done.stderr and "not-the-secret" not in wrong.stdout + wrong.stderr


def test_cron_route_on_an_unmigrated_database_logs_the_migrate_hint(pg, tmp_path, caplog):
    name = f"kaireon_empty_{uuid.uuid4().hex[:8]}"
    url = pg.create_database(name)
    try:
        settings = make_settings(url, tmp_path)
        with caplog.at_level(logging.ERROR, logger="kaireon_pub.reaper"), running_server(settings) as base:
            status, _, body = request(base + CRON_PATH, "POST", headers={"Authorization": f"Bearer {SECRET}"})
    finally:
        pg.drop_database(name)
    assert status == 500 and orjson.loads(body)["errorId"]
    (line,) = [r for r in caplog.records if r.name == "kaireon_pub.reaper"]
    assert line.getMessage() == "reaper run failed: the database has no kaireon-pub schema: run `kaireon-pub migrate`"
    assert line.errorId == orjson.loads(body)["errorId"]
