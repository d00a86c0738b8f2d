"""The HTTP surface in-process, through wsgiref's WSGI validator, with a fake reaper.

The auth matrix of issue 4, methods (405 + Allow), unknown paths (404), body limits (413), 500s
that show only an errorId, and the probes /healthz, /readyz and /metrics.
"""

from __future__ import annotations

import hmac
import io
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import orjson
import pytest

from kaireon_pub import logs
from kaireon_pub.http import cron_auth
from kaireon_pub.http.app import CRON_PATH, make_app
from kaireon_pub.reaper import RESULT_KEYS, ReaperError
from kaireon_pub.settings import Settings

SECRET = "s3cret-Cron-value"
UNAUTHORIZED = b'{"error":"unauthorized"}'
# The fake returns one key too many: the route must answer exactly the spec's five.
RESULT = {"status": "ok", "stalenessSeconds": 300, "resetCount": 2, "durationMs": 14,
          "timestamp": "2026-04-30T14:20:00.000Z", "internal": "not for clients"}


class FakeReaper:
    def __init__(self, error: Exception | None = None):
        self.error = error
        self.calls: list[str] = []

    def __call__(self, settings: Settings, *, source: str) -> dict[str, object]:
        self.calls.append(source)
        if self.error is not None:
            raise self.error
        return dict(RESULT)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    header_list: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> object:
        return orjson.loads(self.body)


def settings_with(secret: str | None, tmp_path=None, **changes: object) -> Settings:
    liveness = str(tmp_path / "alive") if tmp_path is not None else "/nonexistent/alive"
    return Settings(database_url="postgresql://reaper@127.0.0.1:1/unused", kafka_bootstrap_servers="",
                    cron_secret=secret, liveness_file=liveness, **changes)


def call(app, method: str | None = None, path: str = CRON_PATH, headers: dict[str, str] | None = None,
         body: bytes = b"", query: str = "", validate: bool = True) -> Reply:
    """A request through wsgiref's validator, which checks the app keeps the WSGI contract
    (`validate=False` for requests the validator itself refuses, e.g. a bad Content-Length)."""
    method = method or ("POST" if path == CRON_PATH else "GET")
    environ: dict[str, object] = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, QUERY_STRING=query,
                   CONTENT_LENGTH=str(len(body)) if body else "")
    environ["wsgi.input"] = io.BytesIO(body)
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_LENGTH", "CONTENT_TYPE") else f"HTTP_{key}"] = value
    captured: dict[str, object] = {}

    def start_response(status, response_headers, exc_info=None):
        captured["status"], captured["headers"] = status, response_headers
        return lambda data: None

    result = (validator(app) if validate else app)(environ, start_response)
    try:
        out = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    header_list = list(captured["headers"])  # type: ignore[arg-type]
    return Reply(int(str(captured["status"]).split(" ", 1)[0]), dict(header_list), out, header_list)


def json_lines(caplog) -> list[str]:
    formatter = logs.JsonFormatter()
    return [formatter.format(r) for r in caplog.records]


# ---- the auth matrix -------------------------------------------------------------------------

def latin1(text: str) -> str:
    """How a WSGI server hands over a header sent as UTF-8 bytes (PEP 3333: latin-1 code points)."""
    return text.encode("utf-8").decode("latin-1")


MATRIX = [
    # (case, configured CRON_SECRET, request headers, expected status)
    ("secret unset", None, {"Authorization": f"Bearer {SECRET}"}, 401),
    ("secret empty", "", {"Authorization": "Bearer "}, 401),
    ("secret blank", "   ", {"Authorization": "Bearer    ", "x-cron-secret": "   "}, 401),
    ("header missing", SECRET, {}, 401),
    ("wrong Bearer", SECRET, {"Authorization": "Bearer wrong"}, 401),
    ("wrong Bearer, a prefix of the secret", SECRET, {"Authorization": f"Bearer {SECRET[:-1]}"}, 401),
    ("wrong x-cron-secret", SECRET, {"x-cron-secret": "wrong"}, 401),
    ("right Bearer", SECRET, {"Authorization": f"Bearer {SECRET}"}, 200),
    ("right x-cron-secret", SECRET, {"x-cron-secret": SECRET}, 200),
    ("both right", SECRET, {"Authorization": f"Bearer {SECRET}", "x-cron-secret": SECRET}, 200),
    ("both, Bearer wrong", SECRET, {"Authorization": "Bearer wrong", "x-cron-secret": SECRET}, 401),
    ("both, x-cron-secret wrong", SECRET, {"Authorization": f"Bearer {SECRET}", "x-cron-secret": "wrong"}, 401),
    # RFC 7235: the auth scheme is case-insensitive, so `bearer` and `BEARER` are accepted.
    ("lowercase bearer", SECRET, {"Authorization": f"bearer {SECRET}"}, 200),
    ("uppercase BEARER", SECRET, {"Authorization": f"BEARER {SECRET}"}, 200),
    ("another scheme with the secret", SECRET, {"Authorization": f"Basic {SECRET}"}, 401),
    ("Authorization without a scheme", SECRET, {"Authorization": SECRET}, 401),
    ("Bearer without a token", SECRET, {"Authorization": "Bearer"}, 401),
    ("empty x-cron-secret beside a right Bearer", SECRET,
     {"Authorization": f"Bearer {SECRET}", "x-cron-secret": ""}, 401),
    ("non-ASCII value (UTF-8 on the wire)", SECRET, {"x-cron-secret": latin1("sécret-ü")}, 401),
    ("non-ASCII Bearer (UTF-8 on the wire)", SECRET, {"Authorization": latin1("Bearer 秘密")}, 401),
    ("non-latin-1 str (not bytes-representable)", SECRET, {"x-cron-secret": "秘密"}, 401),
    ("non-ASCII secret, same bytes presented", "sécret-ü", {"x-cron-secret": latin1("sécret-ü")}, 200),
    ("non-ASCII secret, latin-1 spelling presented", "sécret-ü", {"x-cron-secret": "sécret-ü"}, 401),
    ("Bearer None with the secret unset", None, {"Authorization": "Bearer None"}, 401),
    ("x-cron-secret None with the secret unset", None, {"x-cron-secret": "None"}, 401),
    ("Bearer None with a placeholder secret", "None", {"Authorization": "Bearer None"}, 401),
    ("Bearer undefined with a placeholder secret", "undefined", {"Authorization": "Bearer undefined"}, 401),
    ("Bearer None with a real secret", SECRET, {"Authorization": "Bearer None"}, 401),
    # Two x-cron-secret headers arrive joined by a comma and never match.
    ("repeated x-cron-secret", SECRET, {"x-cron-secret": f"{SECRET},{SECRET}"}, 401),
    # Surrounding whitespace is stripped on both sides (a mounted secret's trailing newline).
    ("secret with a trailing newline", SECRET + "\n", {"Authorization": f"Bearer  {SECRET} "}, 200),
]


@pytest.mark.parametrize(("case", "secret", "headers", "expected"), MATRIX, ids=[m[0] for m in MATRIX])
@pytest.mark.parametrize("method", ["POST"])
def test_auth_matrix(case, secret, headers, expected, method):
    reaper = FakeReaper()
    reply = call(make_app(settings_with(secret), reaper=reaper), method, headers=headers)

    assert reply.status == expected, case
    if expected == 401:
        assert reply.body == UNAUTHORIZED
        assert reply.headers["WWW-Authenticate"] == 'Bearer realm="kaireon-pub"'
        assert reaper.calls == []
    else:
        assert list(reply.json()) == list(RESULT_KEYS)
        assert reply.json() == {k: RESULT[k] for k in RESULT_KEYS}
        assert reaper.calls == ["http"]
    assert reply.headers["Content-Type"] == "application/json"


def test_401_is_the_same_whether_the_secret_is_unset_or_wrong():
    def refusal(secret):
        reply = call(make_app(settings_with(secret), reaper=FakeReaper()),
                     headers={"Authorization": "Bearer guess"})
        return reply.status, reply.header_list, reply.body

    unset, empty, blank, wrong = (refusal(s) for s in (None, "", " ", SECRET))
    assert unset == empty == blank == wrong
    assert unset[0] == 401


def test_comparison_is_on_bytes_through_compare_digest(monkeypatch):
    seen: list[tuple[type, type]] = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(cron_auth.hmac, "compare_digest", spy)
    app = make_app(settings_with(SECRET), reaper=FakeReaper())
    assert call(app, headers={"x-cron-secret": "wrong"}).status == 401
    assert call(app, headers={"x-cron-secret": SECRET}).status == 200
    assert seen == [(bytes, bytes), (bytes, bytes)]


def test_every_credential_is_checked_even_after_a_mismatch(monkeypatch):
    # No short-circuit: which of two headers was wrong must not show in the timing.
    calls: list[int] = []
    real = hmac.compare_digest
    monkeypatch.setattr(cron_auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    app = make_app(settings_with(SECRET), reaper=FakeReaper())
    assert call(app, headers={"Authorization": "Bearer wrong", "x-cron-secret": SECRET}).status == 401
    assert len(calls) == 2


def test_a_refusal_logs_an_error_id_and_no_secret(caplog):
    caplog.set_level(logging.DEBUG)
    presented = "presented-GUESS-value"
    for secret in (None, SECRET):
        call(make_app(settings_with(secret), reaper=FakeReaper()),
             headers={"Authorization": f"Bearer {presented}", "x-cron-secret": presented})
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "http refused"]
    assert [r.status for r in refusals] == [401, 401]
    assert all(re.fullmatch(r"[0-9a-f]{16}", r.errorId) for r in refusals)
    # The reason is for the operator, in the log only.
    assert [r.reason for r in refusals] == ["CRON_SECRET is not set", "credentials do not match"]
    for line in json_lines(caplog):
        assert SECRET not in line and presented not in line


# ---- methods, paths, bodies --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE"])
def test_other_methods_get_405_with_allow_and_never_run_the_reaper(method):
    reaper = FakeReaper()
    reply = call(make_app(settings_with(SECRET), reaper=reaper), method,
                 headers={"Authorization": f"Bearer {SECRET}"})
    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"
    assert reply.body == (b"" if method == "HEAD" else b'{"error":"method not allowed"}')
    assert reaper.calls == []


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
def test_probe_routes_allow_get_and_head_only(path):
    reply = call(make_app(settings_with(SECRET), reaper=FakeReaper(), readiness=lambda: {}), "POST", path)
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("path", ["/", "/api/v1/cron/outbox-reaper/", "/api/v1/cron/outbox-reaperx",
                                  "/API/v1/cron/outbox-reaper", "/api/v1/cron", "/metrics/x"])
@pytest.mark.parametrize("method", ["GET", "POST", "HEAD"])
def test_unknown_paths_are_404(path, method):
    reaper = FakeReaper()
    reply = call(make_app(settings_with(SECRET), reaper=reaper), method, path,
                 headers={"Authorization": f"Bearer {SECRET}"})
    assert reply.status == 404
    assert reply.body == (b"" if method == "HEAD" else b'{"error":"not found"}')
    assert reaper.calls == []


def test_body_over_1_kib_is_413_and_the_reaper_does_not_run():
    reaper = FakeReaper()
    app = make_app(settings_with(SECRET), reaper=reaper)
    auth = {"Authorization": f"Bearer {SECRET}"}
    too_big = call(app, "POST", headers=auth, body=b"x" * 1025)
    assert too_big.status == 413
    assert too_big.body == b'{"error":"request body too large"}'
    assert reaper.calls == []
    # The limit itself is accepted (and the body ignored).
    assert call(app, "POST", headers=auth, body=b"x" * 1024).status == 200
    assert reaper.calls == ["http"]


def test_a_large_declared_length_is_refused_without_reading_it():
    # 10 MB declared, nothing sent: the app must not try to read (it would block on a socket).
    reaper = FakeReaper()
    reply = call(make_app(settings_with(SECRET), reaper=reaper), "POST",
                 headers={"Authorization": f"Bearer {SECRET}", "Content-Length": "10000000"})
    assert reply.status == 413
    assert reaper.calls == []


def test_chunked_body_is_413_and_bad_content_length_is_400():
    reaper = FakeReaper()
    app = make_app(settings_with(SECRET), reaper=reaper)
    auth = {"Authorization": f"Bearer {SECRET}"}
    assert call(app, "POST", headers={**auth, "Transfer-Encoding": "chunked"}).status == 413
    assert call(app, "POST", headers={**auth, "Content-Length": "abc"}, validate=False).status == 400
    assert call(app, "POST", headers={**auth, "Content-Length": "-1"}, validate=False).status == 400
    assert reaper.calls == []


# ---- failures: an errorId, no stack trace ------------------------------------------------------

def test_a_failing_reaper_is_a_500_with_only_an_error_id(caplog):
    caplog.set_level(logging.DEBUG)
    app = make_app(settings_with(SECRET), reaper=FakeReaper(RuntimeError(f"boom near {SECRET}")))
    reply = call(app, headers={"x-cron-secret": SECRET})

    assert reply.status == 500
    body = reply.json()
    assert list(body) == ["errorId"] and re.fullmatch(r"[0-9a-f]{16}", body["errorId"])
    assert b"Traceback" not in reply.body and b"boom" not in reply.body
    logged = [r for r in caplog.records if getattr(r, "errorId", None) == body["errorId"]]
    assert len(logged) == 1 and logged[0].levelname == "ERROR"
    assert "RuntimeError" in logged[0].traceback and "***" in logged[0].traceback
    assert all(SECRET not in line for line in json_lines(caplog))


def test_a_reaper_error_keeps_the_error_id_it_was_logged_under():
    app = make_app(settings_with(SECRET), reaper=FakeReaper(ReaperError("0123456789abcdef")))
    reply = call(app, "POST", headers={"x-cron-secret": SECRET})
    assert (reply.status, reply.json()) == (500, {"errorId": "0123456789abcdef"})


# ---- the probes --------------------------------------------------------------------------------

def test_healthz_follows_the_liveness_file_age(tmp_path):
    app = make_app(settings_with(SECRET, tmp_path), reaper=FakeReaper(), readiness=lambda: {})
    missing = call(app, path="/healthz")
    assert (missing.status, missing.json()) == (503, {"status": "missing", "maxStaleSeconds": 90.0})

    alive = tmp_path / "alive"
    alive.touch()
    fresh = call(app, path="/healthz")
    assert fresh.status == 200 and fresh.json()["status"] == "ok"

    old = time.time() - 120
    os.utime(alive, (old, old))
    stale = call(app, path="/healthz")
    assert stale.status == 503 and stale.json()["status"] == "stale"
    assert stale.json()["ageSeconds"] >= 119
    assert call(app, path="/healthz", query="maxStaleSeconds=300").status == 200
    assert call(app, path="/healthz", query="maxStaleSeconds=60").status == 503
    assert call(app, "HEAD", "/healthz", query="maxStaleSeconds=300").body == b""
    for bad in ("abc", "0", "-1", "nan", "inf"):
        assert call(app, path="/healthz", query=f"maxStaleSeconds={bad}").status == 400


@pytest.mark.parametrize(("checks", "status"), [
    ({"database": True, "broker": True}, 200),
    ({"database": True, "broker": False}, 503),
    ({"database": False, "broker": True}, 503),
    ({}, 503),
])
def test_readyz_is_200_only_when_every_check_passes(checks, status):
    reply = call(make_app(settings_with(SECRET), reaper=FakeReaper(), readiness=lambda: checks), path="/readyz")
    assert reply.status == status
    assert reply.json() == {"status": "ready" if status == 200 else "not ready", "checks": checks}


def test_readyz_failing_check_is_503_with_an_error_id(caplog):
    caplog.set_level(logging.DEBUG)

    def broken():
        raise RuntimeError(f"cannot reach {SECRET}")

    reply = call(make_app(settings_with(SECRET), reaper=FakeReaper(), readiness=broken), path="/readyz")
    assert reply.status == 503
    assert reply.json()["status"] == "not ready"
    error_id = reply.json()["errorId"]
    assert any(getattr(r, "errorId", None) == error_id for r in caplog.records)
    assert all(SECRET not in line for line in json_lines(caplog))


def test_metrics_is_prometheus_text():
    app = make_app(settings_with(SECRET), reaper=FakeReaper(), readiness=lambda: {})
    reply = call(app, path="/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE " in reply.body
    assert call(app, "HEAD", "/metrics").body == b""


def test_head_metrics_is_200_with_the_gets_headers_and_no_body():
    # prometheus-client's own app answers HEAD with 405 (Allow: OPTIONS,GET).
    app = make_app(settings_with(SECRET), reaper=FakeReaper(), readiness=lambda: {})
    head, got = call(app, "HEAD", "/metrics"), call(app, "GET", "/metrics")
    assert (head.status, head.body) == (200, b"")
    assert head.headers["Content-Type"] == got.headers["Content-Type"]
    assert "Allow" not in head.headers


def test_metrics_scrape_survives_a_process_that_has_not_written_its_file_yet(tmp_path):
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    # One process's counter, as prometheus-client's multiprocess mode writes it...
    written = MmapedDict(str(tmp_path / "counter_100.db"))
    written.write_value(mmap_key("kaireon_outbox_processed_total", "kaireon_outbox_processed_total",
                                 ["outcome"], ["published"], "Events handled."), 7.0, 0.0)
    written.close()
    # ...and a process forked a moment ago: its file exists, its header does not yet.
    (tmp_path / "counter_200.db").touch()
    app = make_app(settings_with(SECRET, prometheus_multiproc_dir=str(tmp_path)), reaper=FakeReaper(),
                   readiness=lambda: {})
    reply = call(app, path="/metrics")
    assert reply.status == 200
    assert b'kaireon_outbox_processed_total{outcome="published"} 7.0' in reply.body


# ---- rotation, one run at a time (issue 26) ------------------------------------------------------

NEW = "new-secret-" + "n" * 16
OLD = "old-secret-" + "o" * 16


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {NEW}"}, {"x-cron-secret": OLD},
                                     {"Authorization": f"Bearer {OLD}", "x-cron-secret": NEW}])
def test_during_a_rotation_the_previous_secret_is_accepted_beside_the_new_one(headers):
    reaper = FakeReaper()
    app = make_app(settings_with(NEW, cron_secret_previous=OLD), reaper=reaper)
    assert call(app, headers=headers).status == 200
    assert call(app, headers={"x-cron-secret": "guess-" + "g" * 16}).status == 401
    assert reaper.calls == ["http"]


def test_the_previous_secret_is_refused_once_its_window_has_passed():
    clock = Clock(1_000.0)
    app = make_app(settings_with(NEW, cron_secret_previous=OLD, cron_secret_previous_expires_at=2_000.0),
                   reaper=FakeReaper())
    app.cron_secrets.clock = clock
    assert call(app, headers={"x-cron-secret": OLD}).status == 200
    clock.now = 2_000.0
    assert call(app, headers={"x-cron-secret": OLD}).status == 401
    assert call(app, headers={"x-cron-secret": NEW}).status == 200


def test_a_previous_secret_without_a_current_one_opens_nothing():
    # Settings refuse this (exit 2); the route, given it anyway, stays closed.
    app = make_app(settings_with(None, cron_secret_previous=OLD), reaper=FakeReaper())
    assert call(app, headers={"x-cron-secret": OLD}).status == 401


def test_a_second_authenticated_call_while_a_run_is_in_flight_is_429_with_retry_after(caplog):
    caplog.set_level(logging.DEBUG)
    entered, release = threading.Event(), threading.Event()

    def slow_reaper(settings, *, source):
        entered.set()
        assert release.wait(10)
        return dict(RESULT)

    app = make_app(settings_with(SECRET), reaper=slow_reaper)
    first: list[Reply] = []
    thread = threading.Thread(target=lambda: first.append(call(app, headers={"x-cron-secret": SECRET})))
    thread.start()
    try:
        assert entered.wait(10)
        started = time.monotonic()
        busy = call(app, headers={"x-cron-secret": SECRET})
        assert time.monotonic() - started < 1  # answered at once, not parked behind the run
        assert (busy.status, busy.headers["Retry-After"], busy.json()) == (
            429, "5", {"error": "a reaper run is in flight"})
        # Authentication comes first: a wrong secret is a 401 whatever is in flight.
        assert call(app, headers={"x-cron-secret": "wrong"}).status == 401
    finally:
        release.set()
        thread.join(10)
    assert first[0].status == 200
    assert call(app, headers={"x-cron-secret": SECRET}).status == 200  # the lock was released
    refused = [r for r in caplog.records if getattr(r, "event", None) == "http refused" and r.status == 429]
    assert len(refused) == 1 and re.fullmatch(r"[0-9a-f]{16}", refused[0].errorId)


def test_a_failing_run_releases_the_one_run_lock():
    app = make_app(settings_with(SECRET), reaper=FakeReaper(ReaperError("0123456789abcdef")))
    assert [call(app, headers={"x-cron-secret": SECRET}).status for _ in range(2)] == [500, 500]


def test_get_on_the_cron_route_is_405_allow_post():
    reaper = FakeReaper()
    reply = call(make_app(settings_with(SECRET), reaper=reaper), "GET", headers={"x-cron-secret": SECRET})
    assert (reply.status, reply.headers["Allow"]) == (405, "POST")
    assert reaper.calls == []


# ---- CRON_SECRET_FILE: re-read when the file changes ---------------------------------------------

def rotate(path, value: str) -> None:
    """As a Kubernetes Secret volume does: a new file swapped in under the same name."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)


def test_a_rotated_cron_secret_file_takes_effect_without_a_restart(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    secret_file = tmp_path / "cron"
    secret_file.write_text(OLD + "\n")
    settings = Settings.from_env({"DATABASE_URL": "postgresql:///x", "KAFKA_BOOTSTRAP_SERVERS": "b:1",
                                  "CRON_SECRET_FILE": str(secret_file)})
    assert settings.cron_secret == OLD and settings.cron_secret_file == str(secret_file)
    app = make_app(settings, reaper=FakeReaper())
    assert call(app, headers={"x-cron-secret": OLD}).status == 200

    rotate(secret_file, NEW)
    assert call(app, headers={"x-cron-secret": NEW}).status == 200
    assert call(app, headers={"x-cron-secret": OLD}).status == 401

    # A rotated value too short (or a file gone) closes the route until the file is fixed.
    rotate(secret_file, "short")
    assert call(app, headers={"x-cron-secret": "short"}).status == 401
    assert call(app, headers={"x-cron-secret": NEW}).status == 401
    secret_file.unlink()
    assert call(app, headers={"x-cron-secret": NEW}).status == 401
    rotate(secret_file, NEW)
    assert call(app, headers={"x-cron-secret": NEW}).status == 200

    events = [r.event for r in caplog.records if getattr(r, "event", "").startswith("cron secret")]
    assert events == ["cron secret reloaded", "cron secret refused", "cron secret refused", "cron secret reloaded"]
    for line in json_lines(caplog):
        assert OLD not in line and NEW not in line and "short" not in line.replace("shorter", "")


def test_secrets_built_after_a_rotation_serve_the_file_as_it_is_now(tmp_path, caplog):
    """An HTTP child respawned after a rotation builds its CronSecrets from the Settings the
    supervisor read at its start: the file, not that stale value, decides what is accepted."""
    caplog.set_level(logging.DEBUG)
    secret_file = tmp_path / "cron"
    secret_file.write_text(OLD + "\n")
    settings = Settings.from_env({"DATABASE_URL": "postgresql:///x", "KAFKA_BOOTSTRAP_SERVERS": "b:1",
                                  "CRON_SECRET_FILE": str(secret_file)})
    assert settings.cron_secret == OLD
    assert cron_auth.CronSecrets(settings).accepted() == [OLD]

    rotate(secret_file, NEW)
    respawned = cron_auth.CronSecrets(settings)
    assert respawned.accepted() == [NEW]
    assert cron_auth.authenticate({"HTTP_X_CRON_SECRET": NEW}, respawned.accepted()) is None
    assert cron_auth.authenticate({"HTTP_X_CRON_SECRET": OLD}, respawned.accepted()) is not None

    # Rotated to a refused value before the child starts: closed, as for a running child.
    rotate(secret_file, "short")
    assert cron_auth.CronSecrets(settings).accepted() == [None]
    events = [r.event for r in caplog.records if getattr(r, "event", "").startswith("cron secret")]
    assert events == ["cron secret reloaded", "cron secret refused"]
