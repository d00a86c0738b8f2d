"""Horizon without services: the timers of unknown transactions, the passed-over memory, the
rewinds when a passed-over transaction ends, and the overflow that falls back to a full rescan.
`read()` goes through a stand-in connection that returns claim_horizon's row as given."""

from __future__ import annotations

import asyncio
import logging

from kaireon_pub import metrics
from kaireon_pub.db.queries import Q
from kaireon_pub.worker import horizon as horizon_module
from kaireon_pub.worker.horizon import Horizon
from tests.unit.worker_fakes import Clock, scan, value


def make(clock: Clock, max_wait_ms: int = 2000) -> Horizon:
    return Horizon(max_wait_ms, scan(clock), clock)


def test_unknown_xids_are_timed_from_when_first_seen_and_passed_after_the_max_wait():
    clock = Clock()
    h = make(clock)
    h.absorb(clock.now, None, [], [7, 8], [])
    assert h.due_to_pass(clock.now + 1.9) == []
    clock.now += 1
    h.absorb(clock.now, None, [], [8, 9], [])  # 7 ended: forgotten; 8 keeps its first sighting
    assert h.unknown_since == {8: clock.now - 1, 9: clock.now}
    assert h.due_to_pass(clock.now + 1.0) == [8]
    assert h.unknown_passed == [8]


def test_an_ended_passed_over_xid_rewinds_every_cursor_to_it():
    clock = Clock()
    h = make(clock)
    h.scan.cursors = {1: (100, 5), 2: (40, 1)}
    fresh = h.absorb(clock.now, 3.5, [50, 60], [], [])
    assert fresh == [50, 60] and value(metrics.HORIZON_AGE) == 3.5
    bypassed = value(metrics.HORIZON_BYPASSED)
    h.remember(fresh)
    assert value(metrics.HORIZON_BYPASSED) == bypassed + 2
    assert h.absorb(clock.now, None, [60], [], [50]) == []  # 60 is remembered already
    assert h.passed_over == {60: clock.now}
    assert h.scan.cursors == {1: (50, 0), 2: (40, 1)}
    assert value(metrics.HORIZON_AGE) == 0.0


def test_too_many_passed_over_fall_back_to_a_full_rescan(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(horizon_module, "MAX_PASSED_OVER", 3)
    h = make(clock)
    h.remember([1, 2])
    assert h.scan.next_full_rescan > clock.now
    h.remember([3, 4])
    assert h.passed_over == {3: clock.now, 4: clock.now} and h.scan.next_full_rescan == clock.now


class Cursor:
    def __init__(self, rows):
        self.rows = rows

    async def fetchone(self):
        return self.rows[0]

    async def fetchall(self):
        return self.rows


class Conn:
    """Answers claim_horizon with `horizon_row` and horizon_holders with `holders`."""

    def __init__(self, horizon_row, holders=()):
        self.horizon_row, self.holders = horizon_row, list(holders)
        self.calls: list[tuple[str, dict]] = []

    async def execute(self, query, params=None):
        self.calls.append((query, params))
        return Cursor([self.horizon_row] if query == Q.claim_horizon else self.holders)


def test_read_passes_its_memory_and_logs_the_holders_of_fresh_bypasses(caplog):
    clock = Clock()
    h = make(clock)
    h.unknown_since = {9: clock.now - 5}
    conn = Conn(("1234", 7.0, [50], [9], []), holders=[(11, None, "db", "app", True, 7.04), (12, None, "db", "x", False, 1)])
    assert asyncio.run(h.read(conn)) == "1234"
    (q1, p1), (q2, p2) = conn.calls
    assert q1 == Q.claim_horizon and p1 == {"max_wait_ms": 2000, "remembered": [], "pass_over": [9]}
    assert q2 == Q.horizon_holders and p2 == {"max_wait_ms": 2000, "pass_over": [9]}
    lines = [r for r in caplog.records if getattr(r, "event", None) == "horizon bypass"]
    assert [(r.holderPid, r.xids, r.ageSeconds) for r in lines] == [(11, [50], 7.0)]
    assert lines[0].levelno == logging.WARNING
    conn = Conn(("1300", 0.0, [50], [], []))
    asyncio.run(h.read(conn))
    assert len(conn.calls) == 1 and conn.calls[0][1]["remembered"] == [50]  # known: no second report
