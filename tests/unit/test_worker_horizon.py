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
    """Answers claim_horizon (and claim_horizon_foreign) with `horizon_row`, horizon_holders with
    `holders` and restamp_shards_foreign_rows with `restamped`."""

    def __init__(self, horizon_row, holders=(), restamped=0):
        self.horizon_row, self.holders, self.restamped = horizon_row, list(holders), restamped
        self.calls: list[tuple[str, dict]] = []

    async def execute(self, query, params=None):
        self.calls.append((query, params))
        if query == Q.restamp_shards_foreign_rows:
            return Cursor([(self.restamped,)])
        horizon = query in (Q.claim_horizon, Q.claim_horizon_foreign)
        return Cursor([self.horizon_row] if horizon else self.holders)


def test_read_passes_its_memory_and_logs_the_holders_of_fresh_bypasses(caplog):
    clock = Clock()
    h = make(clock)
    h.unknown_since = {9: clock.now - 5}
    conn = Conn(("1234", 7.0, [50], [9], []),
                holders=[(11, None, "db", "app", True, 7.04), (12, None, "db", "x", False, 1)])
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


class RunningXids:
    """claim_horizon as it answers for transactions whose session the tier cannot see (another
    role's, without pg_read_all_stats): each is `unknown` until the worker passes it back in
    pass_over, then `bypassed`; the horizon is the oldest one still waited for."""

    def __init__(self, *xids: int):
        self.running = list(xids)

    def row(self, pass_over: list[int]) -> tuple:
        held = [x for x in self.running if x not in pass_over]
        return (str(min(held, default=1000)), None, [x for x in self.running if x in pass_over], held, [])


def test_two_unknown_transactions_a_second_apart_are_both_passed_over_after_the_max_wait():
    """Issue 25, case 1: a passed-over unknown xid kept its place in the unknown list only while
    waited for, so its timer started again and the two passed each other's turn for ever."""
    clock = Clock()
    h = make(clock)  # max wait 2 s
    sql = RunningXids(500)
    horizons = []
    for step in range(100):  # 10 s in 0.1 s steps
        clock.now = 1000.0 + step / 10
        if step == 10:
            sql.running.append(501)  # the second one, a second later
        row = sql.row(h.due_to_pass(clock.now))
        fresh = h.absorb(clock.now, *row[1:])
        h.remember(fresh)
        horizons.append((round(clock.now - 1000, 1), row[0]))
    passed_both = [t for t, horizon in horizons if horizon == "1000"]
    assert passed_both and passed_both[0] == 3.0  # 501 seen at 1 s, waited for 2 s
    assert passed_both == [t for t, _ in horizons if t >= 3.0]  # and never waited for again
    assert set(h.passed_over) == {500, 501} and set(h.unknown_since) == {500, 501}
    # Both end: their timers go, and every cursor goes back to them.
    h.scan.cursors = {4: (900, 1)}
    sql.running = []
    h.absorb(clock.now, None, [], [], [500, 501])
    assert h.unknown_since == {} and h.passed_over == {} and h.scan.cursors == {4: (500, 0)}


def test_the_horizon_age_counts_an_unknown_transaction_from_its_first_sighting():
    clock = Clock()
    h = make(clock)
    h.absorb(clock.now, None, [], [7], [])
    assert value(metrics.HORIZON_AGE) == 0.0
    clock.now += 1.5
    h.absorb(clock.now, 0.4, [], [7], [])  # a visible holder open 0.4 s, the unknown one 1.5 s
    assert value(metrics.HORIZON_AGE) == 1.5
    clock.now += 1.0
    assert h.due_to_pass(clock.now) == [7]
    h.absorb(clock.now, None, [7], [], [])  # passed over: the claim waits for nothing
    assert value(metrics.HORIZON_AGE) == 0.0 and 7 in h.unknown_since


def test_read_with_the_claims_shards_restamps_restored_rows_and_rewinds_those_shards(caplog):
    clock = Clock()
    h = make(clock)
    h.scan.cursors = {1: (100, 5), 2: (40, 1), 3: (70, 2)}
    restamped = value(metrics.FOREIGN_RESTAMPED)
    conn = Conn(("1234", None, [], [], [], True), restamped=3)
    assert asyncio.run(h.read(conn, [1, 2])) == "1234"
    (q1, p1), (q2, p2) = conn.calls
    assert q1 == Q.claim_horizon_foreign and p1["shards"] == "{1,2}"
    assert q2 == Q.restamp_shards_foreign_rows and p2 == {"shards": "{1,2}"}
    assert h.rewound and h.scan.cursors == {1: (0, 0), 2: (0, 0), 3: (70, 2)}
    assert value(metrics.FOREIGN_RESTAMPED) == restamped + 3
    line, = [r for r in caplog.records if getattr(r, "event", None) == "foreign rows restamped"]
    assert line.count == 3
    # None seen: no second statement, the cursors stay.
    h.scan.cursors[1] = (90, 1)
    conn = Conn(("1240", None, [], [], [], False))
    asyncio.run(h.read(conn, [1, 2]))
    assert len(conn.calls) == 1 and not h.rewound and h.scan.cursors[1] == (90, 1)
    # Seen, but another worker's pass re-stamped them first: rewound all the same, nothing counted.
    conn = Conn(("1250", None, [], [], [], True), restamped=0)
    asyncio.run(h.read(conn, [1]))
    assert h.rewound and h.scan.cursors[1] == (0, 0) and value(metrics.FOREIGN_RESTAMPED) == restamped + 3


def test_read_reports_rewound_when_a_passed_over_xid_ended():
    clock = Clock()
    h = make(clock)
    h.passed_over = {50: clock.now}
    h.scan.cursors = {1: (100, 5)}
    conn = Conn(("1234", None, [], [], [50], False))
    asyncio.run(h.read(conn, [1]))
    assert h.rewound and h.scan.cursors == {1: (50, 0)}
