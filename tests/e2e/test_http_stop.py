"""The HTTP child is gone within a second of the supervisor's SIGTERM to it, whatever its requests
are doing (issue 25, case 8: a fresh clone's `make test` once waited the whole 15 s drain budget for
an HTTP child that never logged `http stopped`; that hang's cause was not found, so a child that
does not stop is killed HTTP_STOP_GRACE_S after its TERM).

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

import pytest

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
        # It stopped by itself (the KILL is the backstop for a child that cannot, not the way out).
        assert "http kill" not in events, f"round {round_no}: the http child had to be killed ({tier.log_path})"
        assert "http stopped" in events, f"round {round_no}: the http child did not stop by itself"
    print(f"http child stop after its SIGTERM, {ROUNDS} rounds: max {max(timings):.3f} s, "
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
