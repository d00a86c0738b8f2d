"""The HTTP child is gone within a second of the supervisor's SIGTERM to it, whatever its requests
are doing (issue 25, case 8: a fresh clone's `make test` once waited the whole 15 s drain budget for
an HTTP child that never logged `http stopped`; that hang's cause was not found, so a child that
does not stop is killed HTTP_STOP_GRACE_S after its TERM). Three cases: probes being polled (the
child stops by itself, in milliseconds), a child that cannot run its handler (SIGSTOP), and a
request that will not end soon (a reaper run waiting for a lock: the server gives requests in flight
0.3 s and the readiness thread 0.2 s, inside the 0.7 s grace, so the child normally stops by itself;
on a loaded machine the KILL may end it, within the same bound).

The child's stop is timed from the supervisor's `http stopping` line (written just before its
first SIGTERM to the child) to its `supervisor stopped` line (written once it has reaped the
child), both from the log's millisecond timestamps: an upper bound on the child's life after its
signal."""

from __future__ import annotations

import datetime as dt
import http.client
import os
import signal
import threading
import urllib.request
from typing import Any

import psycopg
import pytest

from kaireon_pub.http.app import CRON_PATH
from tests.helpers import tier_env, wait_for

pytestmark = pytest.mark.broker_agnostic("the HTTP child's stop")

CHILD_STOP_BOUND_S = 1.0  # the "within a second of its signal"
ROUNDS = 20


def http_pid(tier) -> int:
    line = tier.wait_log(lambda e: e.get("event") == "http listening" and e.get("role") == "http", 30,
                         "the http child's listening line")
    return int(line["pid"])


def hammer(port: int, path: str, stop: threading.Event, answered: list[int]) -> None:
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                response.read()
            answered.append(1)
        except (OSError, http.client.HTTPException):
            pass  # refused, reset or cut short once the server stops: the point of the test


def _ts(line: dict[str, Any]) -> float:
    return dt.datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


def child_stop_seconds(logs: list[dict[str, Any]]) -> float:
    """From the supervisor's first SIGTERM to the HTTP child to the child reaped."""
    term = next(e for e in logs if e.get("event") == "http stopping" and e.get("role") == "supervisor")
    gone = next(e for e in logs if e.get("event") == "supervisor stopped")
    return _ts(gone) - _ts(term)


def test_sigterm_while_metrics_and_readyz_are_polled_the_child_is_gone_within_a_second(
        db_url, broker, tmp_path, run_tier):
    def start(round_no: int):
        return run_tier(tier_env(db_url, broker.bootstrap, tmp_path / f"r{round_no}", OUTBOX_WORKERS="1"),
                        name=f"round{round_no}")

    timings: list[float] = []
    killed = 0
    upcoming = start(0)
    for round_no in range(ROUNDS):
        tier = upcoming
        port = tier.http_port()
        stop = threading.Event()
        answered: list[int] = []
        pollers = [threading.Thread(target=hammer, args=(port, path, stop, answered), daemon=True)
                   for path in ("/metrics", "/readyz", "/metrics", "/readyz")]
        for poller in pollers:
            poller.start()
        try:
            # Requests in flight when the signal comes: wait until the server has answered some.
            wait_for(lambda answered=answered: len(answered) >= 8, 30, "the server answering the pollers")
            # The next round's tier starts meanwhile (the rounds overlap: the suite's time, and a
            # busier machine for this stop).
            if round_no + 1 < ROUNDS:
                upcoming = start(round_no + 1)
            tier.proc.send_signal(signal.SIGTERM)
            code = tier.wait_exit(30)
        finally:
            stop.set()
            for poller in pollers:
                poller.join(5)
        logs = tier.logs()
        events = [e.get("event") for e in logs]
        assert code == 0, f"round {round_no}: exit code {code}"
        elapsed = child_stop_seconds(logs)
        timings.append(elapsed)
        assert elapsed < CHILD_STOP_BOUND_S, \
            f"round {round_no}: the http child was gone {elapsed:.3f} s after its SIGTERM (log: {tier.log_path})"
        # Normally it stops by itself (the KILL is the backstop for a child that cannot, not the way
        # out); the next tier booting beside the stop on 2 shared cores may delay one past the grace.
        killed += "http kill" in events
        assert "http stopped" in events or "http kill" in events, f"round {round_no}: no stop line ({tier.log_path})"
    assert killed <= 2, f"the http child had to be killed in {killed} of {ROUNDS} rounds"
    print(f"http child stop after its SIGTERM, {ROUNDS} rounds ({killed} killed): max {max(timings):.3f} s, "
          f"median {sorted(timings)[len(timings) // 2]:.3f} s")


def test_an_http_child_that_does_not_stop_is_killed_within_a_second(db_url, broker, tmp_path, run_tier):
    """A stuck HTTP child (SIGSTOP: it cannot run its handler) is killed within a second of its
    signal, with a line saying so, instead of being waited for until the drain budget ends."""
    tier = run_tier(tier_env(db_url, broker.bootstrap, tmp_path, OUTBOX_WORKERS="1"))
    tier.http_port()
    child = http_pid(tier)
    os.kill(child, signal.SIGSTOP)
    tier.proc.send_signal(signal.SIGTERM)
    code = tier.wait_exit(30)
    assert code == 0
    logs = tier.logs()
    elapsed = child_stop_seconds(logs)
    assert elapsed < CHILD_STOP_BOUND_S, f"the stuck http child was gone {elapsed:.3f} s after its SIGTERM"
    killed = next((e for e in logs if e.get("event") == "http kill"), None)
    assert killed is not None, "no 'http kill' line"
    assert killed["httpPid"] == child
    assert killed.get("errorId")
    assert "http stopped" not in [e.get("event") for e in logs]


def test_a_reaper_run_blocked_on_a_lock_does_not_hold_the_childs_stop(db_url, broker, tmp_path, run_tier):
    """A request that will not end soon (a cron reaper run waiting for a table lock another session
    holds) when the signal comes: the child is gone within a second all the same, and the run it
    cut short records nothing (its transaction rolls back)."""
    secret = "http-stop-cron-secret"
    tier = run_tier(tier_env(db_url, broker.bootstrap, tmp_path, OUTBOX_WORKERS="1", CRON_SECRET=secret))
    port = tier.http_port()
    answers: list[object] = []

    def cron_call() -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{CRON_PATH}", method="POST", data=b"",
                                         headers={"Authorization": f"Bearer {secret}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answers.append(response.status)
        except (OSError, http.client.HTTPException) as exc:
            answers.append(exc)  # the server stopped under it: the point of the test

    with psycopg.connect(db_url, autocommit=True) as conn:
        runs_before = conn.execute("SELECT count(*) FROM outbox_reaper_runs").fetchone()[0]
        with psycopg.connect(db_url) as holder:
            # SHARE: the run's INSERT waits; reads of the table (`kaireon-pub status`) do not.
            holder.execute("LOCK TABLE outbox_reaper_runs IN SHARE MODE")
            caller = threading.Thread(target=cron_call, daemon=True)
            caller.start()
            wait_for(lambda: conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'INSERT INTO outbox_reaper_runs%'").fetchone()[0], 30,
                "the reaper run waiting for the lock")
            tier.proc.send_signal(signal.SIGTERM)
            code = tier.wait_exit(30)
            logs = tier.logs()
            elapsed = child_stop_seconds(logs)
            holder.rollback()  # the lock goes; the cut-short run's session finds its client gone
        caller.join(10)
        assert code == 0
        assert elapsed < CHILD_STOP_BOUND_S, \
            f"the http child, a reaper run in flight, was gone {elapsed:.3f} s after its SIGTERM"
        assert answers and not answers[0] == 200, f"the cut-short run answered {answers}"
        wait_for(lambda: not conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO outbox_reaper_runs%' "
            "AND state <> 'idle'").fetchone()[0], 30, "the cut-short run's session to end")
        assert conn.execute("SELECT count(*) FROM outbox_reaper_runs").fetchone()[0] == runs_before
