"""HttpChild.stop, the supervisor's TERM-then-KILL of its HTTP child, on a fake clock and a fake
kill (no process): the KILL comes HTTP_STOP_GRACE_S (at most 0.8 s) after the first TERM, with an
`http kill` line, and the supervisor's loop is told to wake for it (issue 25, case 8)."""

from __future__ import annotations

import logging
import signal

import pytest

from kaireon_pub.settings import Settings
from kaireon_pub.supervisor.children import HTTP_STOP_GRACE_S, HttpChild

BASE = {"DATABASE_URL": "postgresql:///x", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"}
PID = 4242


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def child() -> tuple[HttpChild, Clock, list[tuple[int, int]]]:
    clock = Clock()
    sent: list[tuple[int, int]] = []
    http = HttpChild(Settings.from_env(BASE), clock=clock, signal_fn=lambda pid, sig: sent.append((pid, sig)))
    http.pid = PID
    return http, clock, sent


def run_supervisor_passes(http: HttpChild, clock: Clock, until: float, exits_at: float | None = None) -> None:
    """The supervisor's stopping loop as arbiter.run drives it: sleep (as long as the child lets
    it, at most 0.5 s), then stop() while the child exists. The child exits at `exits_at`."""
    while clock.now < until and http.pid is not None:
        if exits_at is not None and clock.now >= exits_at:
            http.pid = None  # reaped
            return
        http.stop()
        clock.now += max(http.wait_before_next_stop(0.5), 0.001)


def test_the_grace_is_under_a_second_with_room_for_the_kill_and_the_reap():
    assert 0 < HTTP_STOP_GRACE_S <= 0.8


def test_sigterm_first_then_sigkill_when_the_grace_is_over(child, caplog):
    http, clock, sent = child
    caplog.set_level(logging.INFO, "kaireon_pub.supervisor")
    started = clock.now
    run_supervisor_passes(http, clock, until=started + 5)
    terms = [sig for _, sig in sent if sig == signal.SIGTERM]
    kills = [(pid, sig) for pid, sig in sent if sig == signal.SIGKILL]
    assert sent[0] == (PID, signal.SIGTERM)
    assert kills == [(PID, signal.SIGKILL)], "exactly one SIGKILL, then nothing more"
    assert sent[-1] == (PID, signal.SIGKILL)
    assert 1 <= len(terms) <= 3
    # The KILL came at the grace, not a supervisor pass (0.5 s) later.
    kill_line = next(r for r in caplog.records if getattr(r, "event", None) == "http kill")
    stopping_line = next(r for r in caplog.records if getattr(r, "event", None) == "http stopping")
    assert kill_line.levelno == logging.ERROR
    assert kill_line.errorId and len(kill_line.errorId) == 16
    assert kill_line.httpPid == PID
    assert kill_line.graceSeconds == HTTP_STOP_GRACE_S
    assert stopping_line.httpPid == PID


def test_the_kill_is_sent_at_the_grace_not_at_the_next_half_second_pass(child):
    http, clock, sent = child
    kill_times: list[float] = []
    started = clock.now

    def record(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        if sig == signal.SIGKILL:
            kill_times.append(clock.now)

    http.signal_fn = record
    run_supervisor_passes(http, clock, until=started + 5)
    assert kill_times, "no SIGKILL"
    assert HTTP_STOP_GRACE_S <= kill_times[0] - started < HTTP_STOP_GRACE_S + 0.01


def test_a_child_that_exits_in_time_gets_no_sigkill(child):
    http, clock, sent = child
    started = clock.now
    run_supervisor_passes(http, clock, until=started + 5, exits_at=started + HTTP_STOP_GRACE_S / 2)
    assert sent and all(sig == signal.SIGTERM for _, sig in sent)


def test_the_loop_sleeps_its_usual_half_second_when_nothing_is_due(child):
    http, clock, _ = child
    assert http.wait_before_next_stop(0.5) == 0.5  # not stopping
    http.stop()
    assert http.wait_before_next_stop(0.5) == pytest.approx(min(0.5, HTTP_STOP_GRACE_S))
    clock.now += HTTP_STOP_GRACE_S + 1
    assert http.wait_before_next_stop(0.5) == 0.0  # the KILL is overdue: no sleep
    http.stop()
    assert http.wait_before_next_stop(0.5) == 0.5  # killed: only the reap is left
    http.pid = None
    assert http.wait_before_next_stop(0.5) == 0.5


def test_a_child_already_gone_is_not_an_error():
    """The real send_signal: a pid that no longer exists (ESRCH) is ignored."""
    clock = Clock()
    http = HttpChild(Settings.from_env(BASE), clock=clock)
    http.pid = 2**22 + 12345  # above the default pid_max: no such process
    http.stop()
    clock.now += HTTP_STOP_GRACE_S
    http.stop()
    assert http.kill_at == float("inf")
