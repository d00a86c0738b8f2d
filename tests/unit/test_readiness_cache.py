"""/readyz answers from a cached check refreshed on its own clock (issue 26), without services:
a counting fake stands in for the database and broker checks (tests/integration/test_readyz_cache.py
counts real PostgreSQL sessions)."""

from __future__ import annotations

import threading

import pytest

from kaireon_pub.http import app as app_module
from kaireon_pub.http import readiness as readiness_module
from kaireon_pub.http.app import make_app
from kaireon_pub.http.readiness import CachedReadiness, ReadinessUnknown
from kaireon_pub.http.server import serve_forever
from tests.helpers import wait_for
from tests.unit.test_cron_auth import FakeReaper, call, settings_with


class CountingCheck:
    def __init__(self, answer: dict[str, bool] | None = None, error: Exception | None = None):
        self.answer = answer if answer is not None else {"database": True, "broker": True}
        self.error = error
        self.calls = 0

    def __call__(self) -> dict[str, bool]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return dict(self.answer)


def test_a_hundred_probes_run_the_check_once():
    check = CountingCheck()
    cached = CachedReadiness(check, interval=3600)
    app = make_app(settings_with("x" * 16), readiness=cached, reaper=FakeReaper())
    try:
        replies = [call(app, path="/readyz") for _ in range(100)]
    finally:
        app.close()
    assert {r.status for r in replies} == {200}
    assert check.calls == 1 == cached.refreshes


def test_the_check_runs_again_on_its_own_clock_without_any_request():
    check = CountingCheck({"database": True, "broker": False})
    cached = CachedReadiness(check, interval=0.02)
    cached.start()
    try:
        wait_for(lambda: check.calls >= 3, 10, "three checks without a request")
        check.answer = {"database": True, "broker": True}
        wait_for(lambda: cached() == {"database": True, "broker": True}, 10, "the new answer served")
    finally:
        cached.stop()
    thread = cached._thread
    assert thread is not None and not thread.is_alive()
    calls = check.calls
    cached.start()  # a stopped cache stays stopped
    assert cached._thread is thread and check.calls == calls


def test_a_check_that_raised_is_a_503_with_an_error_id_until_it_answers():
    check = CountingCheck(error=RuntimeError("boom"))
    cached = CachedReadiness(check, interval=3600)
    app = make_app(settings_with("x" * 16), readiness=cached, reaper=FakeReaper())
    try:
        with pytest.raises(ReadinessUnknown, match="RuntimeError: boom"):
            cached()
        reply = call(app, path="/readyz")
        assert reply.status == 503 and set(reply.json()) == {"status", "errorId"}
        check.error = None
        cached.refresh()
        assert call(app, path="/readyz").status == 200
    finally:
        app.close()


def test_before_the_first_check_ends_the_answer_is_not_ready():
    release = threading.Event()

    def slow() -> dict[str, bool]:
        release.wait(10)
        return {"database": True, "broker": True}

    cached = CachedReadiness(slow, interval=3600, first_wait=0.01)
    try:
        assert cached() == {}
        app = make_app(settings_with("x" * 16), readiness=cached, reaper=FakeReaper())
        assert call(app, path="/readyz").status == 503
    finally:
        release.set()
        cached.stop()


def test_the_server_starts_the_refresh_with_its_default_app_and_stops_it_at_stop(tmp_path, monkeypatch):
    check = CountingCheck()
    made: list[CachedReadiness] = []

    class Recorded(CachedReadiness):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(readiness_module, "REFRESH_SECONDS", 0.02)
    monkeypatch.setattr(app_module, "DefaultReadiness", lambda settings: check)
    monkeypatch.setattr(app_module, "CachedReadiness", Recorded)
    settings = settings_with("x" * 16, tmp_path, http_host="127.0.0.1", http_port=0)
    stop, listening = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve_forever, args=(settings, stop, lambda port: listening.set()))
    thread.start()
    try:
        assert listening.wait(10)
        # No request: the checks run by themselves.
        wait_for(lambda: check.calls >= 2, 10, "the refresh running without a probe")
        assert len(made) == 1 and made[0]._thread is not None and made[0]._thread.is_alive()
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    refresh = made[0]._thread
    wait_for(lambda: not refresh.is_alive(), 5, "the refresh thread ended with the server")
