"""The HTTP child never holds a stop: SIGTERM ends the tier within seconds whatever its requests
are doing (issue 25, case 8: a fresh clone's `make test` once waited the whole 15 s drain budget
for an HTTP child that never logged `http stopped`)."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
import urllib.request

import pytest

from tests.helpers import tier_env, wait_for

pytestmark = pytest.mark.broker_agnostic("the HTTP child's stop")

# An idle tier stops in well under a second here; the bound leaves room for a loaded machine
# and is far below the 15 s drain budget that the failure used up.
STOP_BOUND_S = 5.0


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


def test_sigterm_while_metrics_and_readyz_are_polled_stops_within_seconds(db_url, broker, tmp_path, run_tier):
    for round_no in range(4):
        tier = run_tier(tier_env(db_url, broker.bootstrap, tmp_path / f"r{round_no}", OUTBOX_WORKERS="2"),
                        name=f"round{round_no}")
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
            started = time.monotonic()
            tier.proc.send_signal(signal.SIGTERM)
            code = tier.wait_exit(30)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            for poller in pollers:
                poller.join(5)
        assert code == 0
        assert elapsed < STOP_BOUND_S, f"round {round_no}: the tier took {elapsed:.1f} s to stop"
        events = [e.get("event") for e in tier.logs()]
        assert "http stopped" in events, f"round {round_no}: the http child did not stop by itself"


def test_an_http_child_that_does_not_stop_is_killed_without_holding_the_drain(db_url, broker, tmp_path, run_tier):
    """A stuck HTTP child (SIGSTOP: it cannot run its handler) is killed shortly after its
    signal, with a line saying so, instead of being waited for until the drain budget ends."""
    tier = run_tier(tier_env(db_url, broker.bootstrap, tmp_path, OUTBOX_WORKERS="2"))
    tier.http_port()
    child = http_pid(tier)
    os.kill(child, signal.SIGSTOP)
    started = time.monotonic()
    tier.proc.send_signal(signal.SIGTERM)
    code = tier.wait_exit(30)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < STOP_BOUND_S, f"the tier took {elapsed:.1f} s to stop"
    killed = tier.wait_log(lambda e: e.get("event") == "http kill", 5, "the supervisor's line on the kill")
    assert killed["httpPid"] == child
    assert killed.get("errorId")
