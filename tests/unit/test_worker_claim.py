"""Claimer and OrphanedClaims without services: a claim whose connection breaks is remembered by
token until it can no longer commit (its session is gone, or its statement timeout has passed,
either seen before a reset), and its rows are reset before every claim until then (issue 25,
case 4)."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from kaireon_pub.db.queries import Q
from kaireon_pub.worker.claim import ORPHAN_MARGIN_S, Claimer, OrphanedClaims
from tests.unit.worker_fakes import Clock, scan, settings

WORKER = uuid.uuid4()


class FakeCursor:
    def __init__(self, rows):
        self.rows = rows

    async def fetchall(self):
        return self.rows

    async def fetchone(self):
        return self.rows[0]


class FakeConn:
    """The server as the reset sees it: the backends still running, the rows a reset finds."""

    def __init__(self, alive=(), found=0, pid=4711, fail: BaseException | None = None):
        self.alive = set(alive)
        self.found = found
        self.statements: list[str] = []
        self.info = type("Info", (), {"backend_pid": pid})()
        self.fail = fail

    async def execute(self, query, params=None, binary=False):
        self.statements.append(query)
        if query == Q.sessions_alive:
            return FakeCursor([(p,) for p in params["pids"] if p in self.alive])
        if query == Q.reset_own_claims:
            assert params == {"worker_id": WORKER}
            return FakeCursor([(self.found,)])
        if self.fail is not None:
            raise self.fail
        return FakeCursor([])


def reset(orphans: OrphanedClaims, conn: FakeConn) -> int:
    return asyncio.run(orphans.reset(conn, WORKER))


def test_a_claim_cut_off_is_remembered_while_its_session_runs():
    clock = Clock()
    orphans = OrphanedClaims(30.0, clock)
    orphans.remember(uuid.uuid4(), 4711)
    # The server still runs the claim (blocked on a lock): the reset finds nothing yet.
    assert reset(orphans, FakeConn(alive={4711})) == 0 and orphans
    # It committed meanwhile, its session still there: its rows are found, it stays remembered.
    assert reset(orphans, FakeConn(alive={4711}, found=20)) == 20 and orphans
    # Its session gone before this reset: the reset is the last one needed.
    conn = FakeConn(alive=set(), found=0)
    assert reset(orphans, conn) == 0 and not orphans
    assert conn.statements == [Q.sessions_alive, Q.reset_own_claims]  # the look comes first


def test_behind_a_transaction_pooler_a_claim_is_remembered_for_its_statement_timeout():
    clock = Clock()
    orphans = OrphanedClaims(30.0, clock)
    orphans.remember(uuid.uuid4(), None)
    conn = FakeConn()
    reset(orphans, conn)
    assert orphans and conn.statements == [Q.reset_own_claims]  # no pid to look up
    clock.now += 30.0 + ORPHAN_MARGIN_S - 0.1
    reset(orphans, conn)
    assert orphans
    clock.now += 0.1
    reset(orphans, conn)
    assert not orphans


def test_a_session_that_outlives_the_statement_timeout_no_longer_holds_a_claim():
    clock = Clock()
    orphans = OrphanedClaims(5.0, clock)
    orphans.remember(uuid.uuid4(), 4711)
    clock.now += 5.0 + ORPHAN_MARGIN_S
    reset(orphans, FakeConn(alive={4711}))  # blackholed: the session idles on, its claim long ended
    assert not orphans


def test_each_claim_cut_off_is_forgotten_on_its_own():
    clock = Clock()
    orphans = OrphanedClaims(30.0, clock)
    first, second = uuid.uuid4(), uuid.uuid4()
    orphans.remember(first, 1)
    orphans.remember(second, 2)
    reset(orphans, FakeConn(alive={2}))
    assert set(orphans.claims) == {second}


@pytest.mark.parametrize("error, orphaned", [
    (psycopg.OperationalError("server closed the connection unexpectedly"), True),
    (psycopg.InterfaceError("the connection is lost"), True),
    (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), False),
])
def test_the_claimer_remembers_a_claim_whose_connection_broke(error, orphaned):
    claimer = Claimer(scan(Clock()), settings())
    token = uuid.uuid4()
    with pytest.raises(type(error)):
        asyncio.run(claimer.claim(FakeConn(pid=4711, fail=error), {"token": token}))
    assert claimer.orphans.claims.get(token, (None,))[0] == (4711 if orphaned else None)
    assert bool(claimer.orphans) is orphaned


def test_behind_a_transaction_pooler_the_claimer_keeps_no_pid():
    claimer = Claimer(scan(Clock()), settings(OUTBOX_POOL_MODE="transaction",
                                              OUTBOX_LISTEN_DATABASE_URL="postgresql:///direct",
                                              OUTBOX_STATEMENT_TIMEOUT_MS=4000))
    token = uuid.uuid4()
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(claimer.claim(FakeConn(fail=psycopg.OperationalError("reset")), {"token": token}))
    assert claimer.orphans.claims[token][0] is None and claimer.orphans.bound_s == 4.0 + ORPHAN_MARGIN_S
