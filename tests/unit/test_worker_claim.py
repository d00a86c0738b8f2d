"""Claimer and OrphanedClaims without services.

The claim's main path (issue 24): the NOWAIT claim meeting a row another session locks is made
again carefully, stepping around the busy rows, and the worker stays careful a while; in lock mode
the plain claim meeting one raises MetLockedRow; both modes' parameters (claim_params).

A claim whose connection breaks is remembered by token until it can no longer commit (its session
is gone, or its statement timeout has passed, either seen before a reset), and its rows are reset
before every claim until then (issue 25, case 4)."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from kaireon_pub import metrics
from kaireon_pub.db.queries import Q
from kaireon_pub.worker.claim import ORPHAN_MARGIN_S, Claimer, MetLockedRow, OrphanedClaims, claim_params
from kaireon_pub.worker.scan import BUSY_RECHECK_S
from tests.unit.worker_fakes import Clock, raw, scan, settings, value

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

    def __init__(self, alive=(), found=0, pid=4711, fail: BaseException | None = None, answers=None):
        self.alive = set(alive)
        self.found = found
        self.statements: list[str] = []
        self.calls: list[tuple[str, dict, bool]] = []  # (query, params, binary) of every statement
        self.info = type("Info", (), {"backend_pid": pid})()
        self.fail = fail
        self.answers = answers or {}  # query -> its rows, or the error the server answers it with

    async def execute(self, query, params=None, binary=False):
        self.statements.append(query)
        self.calls.append((query, params, binary))
        if query in self.answers:
            answer = self.answers[query]
            if isinstance(answer, BaseException):
                raise answer
            return FakeCursor(answer)
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


# ---- the claim's main path ---------------------------------------------------------------------

LOCKED = psycopg.errors.LockNotAvailable("could not obtain lock on row in relation \"outbox_events\"")


def claim(claimer: Claimer, conn: FakeConn, params: dict) -> list[tuple]:
    return asyncio.run(claimer.claim(conn, params))


def test_the_nowait_claim_meeting_a_locked_row_is_made_again_carefully_and_stays_careful_a_while():
    clock = Clock()
    s = scan(clock)
    claimer = Claimer(s, settings())
    params = {"token": uuid.uuid4(), "batch": 100}
    rows = [raw(1, 0, 10)]
    conflicts = value(metrics.CLAIM_LOCK_CONFLICTS)
    conn = FakeConn(answers={Q.claim_batch: LOCKED, Q.claim_careful_batch: rows})
    assert not s.careful()
    assert claim(claimer, conn, params) == rows
    assert conn.statements == [Q.claim_batch, Q.claim_careful_batch]
    (_, plain, plain_binary), (_, careful, careful_binary) = conn.calls
    assert plain == params and plain_binary and careful_binary  # binary results: payloads as bytes
    # The careful claim: the same parameters, and no busy row known yet (it learns them from its answer).
    assert careful == {**params, "busy_shards": "{}", "busy_keys": [], "busy_xids": "{}", "busy_ids": "{}"}
    assert value(metrics.CLAIM_LOCK_CONFLICTS) == conflicts + 1
    assert not claimer.orphans  # the server answered: nothing can commit later
    # Careful a while: the next claims go straight to the careful statement, with the busy rows the
    # last careful claim met (a row without a topic but with its attempts: another session locks it).
    s.take_claimed([raw(7, 3, 70, topic=None, attempts=2)])
    conn = FakeConn(answers={Q.claim_careful_batch: []})
    clock.now += 3 * BUSY_RECHECK_S - 0.1
    assert claim(claimer, conn, params) == []
    assert conn.statements == [Q.claim_careful_batch]
    assert conn.calls[0][1] == {**params, "busy_shards": "{3}", "busy_keys": ["k"], "busy_xids": "{70}",
                                "busy_ids": "{7}"}
    # The busy rows forgotten (a rescan) and the while over: the NOWAIT claim again.
    s.forget_busy([3])
    clock.now += 0.1
    conn = FakeConn(answers={Q.claim_batch: rows})
    assert claim(claimer, conn, params) == rows and conn.statements == [Q.claim_batch]
    assert value(metrics.CLAIM_LOCK_CONFLICTS) == conflicts + 1


def test_the_careful_claim_meeting_a_lock_is_an_error_of_the_claim_not_an_orphan():
    claimer = Claimer(scan(Clock()), settings())
    token = uuid.uuid4()
    conn = FakeConn(answers={Q.claim_batch: LOCKED, Q.claim_careful_batch: LOCKED})
    with pytest.raises(psycopg.errors.LockNotAvailable):
        claim(claimer, conn, {"token": token})
    assert conn.statements == [Q.claim_batch, Q.claim_careful_batch]  # no third try
    assert not claimer.orphans


def test_lock_mode_the_plain_claim_meeting_a_locked_row_raises_met_locked_row():
    s = scan(Clock())
    claimer = Claimer(s, settings(OUTBOX_CLAIM_MODE="lock"))
    params = {"token": uuid.uuid4()}
    conflicts = value(metrics.CLAIM_LOCK_CONFLICTS)
    conn = FakeConn(answers={Q.claim_locked_batch: LOCKED})
    with pytest.raises(MetLockedRow) as met:
        asyncio.run(claimer.claim_locked(conn, params, careful=False))
    assert met.value.__cause__ is LOCKED
    assert conn.calls == [(Q.claim_locked_batch, params, True)]  # one statement: the caller rolls back
    # Counting the conflict and turning careful is the caller's (tick.py: rollback, met_locked_row).
    assert value(metrics.CLAIM_LOCK_CONFLICTS) == conflicts and not s.careful()
    # The plain claim that meets nothing returns its rows.
    rows = [raw(1, 0, 10)]
    assert asyncio.run(claimer.claim_locked(FakeConn(answers={Q.claim_locked_batch: rows}), params, False)) == rows


def test_lock_mode_the_careful_claim_steps_around_busy_rows_and_raises_a_lock_as_it_is():
    s = scan(Clock())
    s.take_claimed([raw(7, 3, 70, topic=None, attempts=1)])
    claimer = Claimer(s, settings(OUTBOX_CLAIM_MODE="lock"))
    params = {"token": uuid.uuid4()}
    rows = [raw(1, 0, 10)]
    conn = FakeConn(answers={Q.claim_careful_locked_batch: rows})
    assert asyncio.run(claimer.claim_locked(conn, params, careful=True)) == rows
    assert conn.calls == [(Q.claim_careful_locked_batch, {**params, "busy_shards": "{3}", "busy_keys": ["k"],
                                                          "busy_xids": "{70}", "busy_ids": "{7}"}, True)]
    with pytest.raises(psycopg.errors.LockNotAvailable):
        asyncio.run(claimer.claim_locked(FakeConn(answers={Q.claim_careful_locked_batch: LOCKED}), params, True))


@pytest.mark.parametrize("strict", [True, False])
def test_claim_params_carry_the_shards_their_epochs_and_cursors(strict):
    s = scan(Clock(), strict=strict)
    s.take_claimed([raw(5, 2, 20), raw(9, 6, 7)])
    worker = uuid.uuid4()
    params = claim_params(settings(OUTBOX_BATCH_SIZE=250), s, [6, 2, 4], {2: 11, 4: 12, 6: 13, 8: 14}, worker)
    assert params == {
        "shards": "{6,2,4}", "epochs": "{13,11,12}",  # in the rotation's order, each shard's own epoch
        "cursor_xids": "{7,20,0}", "cursor_ids": "{9,5,0}",  # a shard never claimed from starts at zero
        "worker_id": worker, "relaxed": not strict, "batch": 250,
    }
    assert claim_params(settings(), s, [], {}, worker)["shards"] == "{}"
