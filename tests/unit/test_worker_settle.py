"""Settler without services: what a settled batch counts (published, retried, failed, released,
unconfirmed, lease lost), the cursors it moves back, the producer stalls it notices, the error it
raises, and a batch kept across a failed mark and settled again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import psycopg
import pytest

from kaireon_pub import metrics
from kaireon_pub.db.queries import Q
from kaireon_pub.errors import SystemicError, TransientError
from kaireon_pub.worker.health import ProducerHealth
from kaireon_pub.worker.kafka.outcome import BatchOutcome
from kaireon_pub.worker.rows import Row, TickResult
from kaireon_pub.worker.settle import Settler, Unsettled
from tests.unit.worker_fakes import Clock, FakePublisher, raw, scan, settings, value


def make_settler(clock: Clock, **env) -> Settler:
    s = settings(**env)
    health = ProducerHealth(0)
    health.publisher = FakePublisher()
    return Settler(s, scan(clock, strict=s.ordering == "strict"), health)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_released_rows_and_rows_settled_after_a_retry_move_their_cursor_back(clock):
    st = make_settler(clock)
    st.scan.cursors = {1: (50, 50), 2: (50, 50), 3: (50, 50)}
    rows = [Row(*raw(10, 1, 10)), Row(*raw(20, 2, 20, attempts=2)), Row(*raw(30, 3, 30))]
    result = TickResult(claimed=3, published=2)
    st.after_settle(rows, BatchOutcome(delivered=[20, 30], released=[10]), [], result)
    assert st.scan.cursors == {1: (10, 9), 2: (20, 20), 3: (50, 50)}
    assert result.released == 1


def test_retries_and_failures_counted_and_the_retry_rescanned_when_due(clock, caplog):
    st = make_settler(clock, OUTBOX_ORDERING="strict")
    result = TickResult(claimed=3, published=1)
    rows = [Row(*raw(i, 1, i)) for i in (1, 2, 3)]
    st.scan.cursors = {1: (3, 3)}
    retried, violations = value(metrics.PROCESSED.labels("retried")), value(metrics.ORDER_VIOLATIONS)
    st.after_settle(rows, BatchOutcome(delivered=[1], retry={2: "x"}, rejected={3: "bad"}),
                    [(2, "pending", 1, 2, 4.0), (3, "failed", 1, 3, 0.0)], result)
    assert (result.retried, result.failed, result.released) == (1, 1, 0)
    assert st.scan.rescan_at[1] == pytest.approx(clock.now + 4.01)
    assert st.scan.cursors == {1: (3, 3)}  # the rejected row is the furthest: nothing behind it
    assert value(metrics.PROCESSED.labels("retried")) == retried + 1
    assert value(metrics.ORDER_VIOLATIONS) == violations  # strict: the key waits
    assert [r.eventId for r in caplog.records if getattr(r, "event", None) == "event failed"] == [3]


def test_relaxed_retry_counts_an_order_violation(clock):
    st = make_settler(clock, OUTBOX_ORDERING="relaxed")
    violations = value(metrics.ORDER_VIOLATIONS)
    st.after_settle([Row(*raw(2, 1, 2))], BatchOutcome(retry={2: "x"}), [(2, "pending", 1, 2, 0.5)], TickResult())
    assert value(metrics.ORDER_VIOLATIONS) == violations + 1


def test_unconfirmed_and_lease_lost_counted_and_the_batch_error_raised(clock, caplog):
    st = make_settler(clock)
    unconfirmed, lost = value(metrics.UNCONFIRMED), value(metrics.LEASE_LOST)
    rows = [Row(*raw(i, 1, i)) for i in (1, 2, 3)]
    result = TickResult(claimed=3, published=1, lease_lost=1)
    with pytest.raises(TransientError, match="timed out"):
        st.after_settle(rows, BatchOutcome(delivered=[1, 2], released=[3], unconfirmed=1,
                                           transient_error="timed out"), [], result)
    assert result.released == 1
    assert value(metrics.UNCONFIRMED) == unconfirmed + 1 and value(metrics.LEASE_LOST) == lost + 1
    assert [r.leaseLost for r in caplog.records if getattr(r, "event", None) == "lease lost"] == [1]
    with pytest.raises(SystemicError):
        st.after_settle(rows, BatchOutcome(delivered=[1], systemic_error="no topic"), [], TickResult())


def test_two_undelivered_batches_in_a_row_mark_the_producer_stalled(clock):
    st = make_settler(clock)
    stalled = BatchOutcome(released=[1], transient_error="timed out")
    rows = [Row(*raw(1, 1, 1))]
    with pytest.raises(TransientError):
        st.after_settle(rows, stalled, [], TickResult())
    assert st.health.publisher.broken is None
    with pytest.raises(TransientError):
        st.after_settle(rows, stalled, [], TickResult())
    assert st.health.publisher.broken_cause == "stalled" and st.health.kafka_stalls == 0


def test_a_delivered_batch_between_timeouts_is_no_stall(clock):
    st = make_settler(clock)
    rows = [Row(*raw(1, 1, 1))]
    for outcome in (BatchOutcome(transient_error="t"), BatchOutcome(delivered=[1], transient_error="t"),
                    BatchOutcome(transient_error="t")):
        with pytest.raises(TransientError):
            st.after_settle(rows, outcome, [], TickResult())
    assert st.health.publisher.broken is None and st.health.kafka_stalls == 1


def test_producer_error_marks_the_producer_broken(clock):
    st = make_settler(clock)
    with pytest.raises(TransientError, match="producer must be recreated"):
        st.after_settle([], BatchOutcome(producer_error="fenced"), [], TickResult())
    assert (st.health.publisher.broken, st.health.publisher.broken_cause) == ("fenced", "producer")


# ---- the marks, through a stand-in connection (which statements, in which transaction) -----------


class FakeCursor:
    def __init__(self, rowcount: int = 0, rows=()):
        self.rowcount = rowcount
        self.rows = list(rows)

    async def fetchall(self):
        return self.rows

    async def fetchone(self):
        return self.rows[0]


class FakeConn:
    def __init__(self, lost: int = 0, fail_on: str | None = None, fail_commit: bool = False):
        self.statements: list[tuple[str, dict]] = []
        self.transactions = 0
        self.lost = lost
        self.fail_on = fail_on  # this statement fails as if the session had died
        self.fail_commit = fail_commit  # the commit is sent and its reply never comes
        self.xact = 7777  # the id of the marks' transaction (lock mode, or a delete)
        self.xact_status: str | None = "aborted"  # what the server says of it

    @contextlib.asynccontextmanager
    async def transaction(self):
        self.transactions += 1
        yield
        if self.fail_commit:
            raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")

    async def execute(self, query, params=None):
        self.statements.append((query, params))
        if self.fail_on == query:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        if query in (Q.mark_published_locked, Q.delete_published_locked):  # the count and the transaction's id
            return FakeCursor(rows=[(params["ids"].count(",") + 1 - self.lost, self.xact)])
        if query == Q.current_xact:
            return FakeCursor(rows=[(self.xact,)])
        if query == Q.xact_status:
            return FakeCursor(rows=[(self.xact_status,)])
        if query in (Q.mark_published, Q.mark_published_again, Q.delete_published):
            return FakeCursor(rowcount=params["ids"].count(",") + 1 - self.lost)
        if query in (Q.mark_retry, Q.mark_retry_locked, Q.mark_retry_again):
            return FakeCursor(rows=[(i, "pending", 1, i, 0.0) for i in params["ids"]])
        return FakeCursor()


class FakePool:
    """connection() fails `fail` times (the database away), then lends `conn`."""

    def __init__(self, conn: FakeConn, fail: int = 0):
        self.conn = conn
        self.fail = fail

    @contextlib.asynccontextmanager
    async def connection(self):
        if self.fail:
            self.fail -= 1
            raise psycopg.OperationalError("connection refused")
        yield self.conn


def test_all_delivered_is_one_mark_without_a_transaction_and_lease_lost_is_the_rest(clock):
    st = make_settler(clock)
    conn = FakeConn(lost=1)
    rows = [Row(*raw(i, 1, i)) for i in (1, 2, 3)]
    result = asyncio.run(st.settle(FakePool(conn), uuid.uuid4(), rows, BatchOutcome(delivered=[1, 2, 3])))
    assert [q for q, _ in conn.statements] == [Q.mark_published] and conn.transactions == 0
    assert (result.claimed, result.published, result.lease_lost) == (3, 2, 1)


def test_a_batch_whose_marks_fail_is_kept_and_settled_again(clock, caplog):
    caplog.set_level(logging.INFO, "kaireon_pub.worker")
    st = make_settler(clock)
    conn = FakeConn()
    pool = FakePool(conn, fail=1)
    rows = [Row(*raw(i, 1, i)) for i in (1, 2)]
    token = uuid.uuid4()
    outcome = BatchOutcome(delivered=[1], retry={2: "x"})
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(st.settle(pool, token, rows, outcome))
    assert st.unsettled == Unsettled(token, rows, outcome)
    asyncio.run(st.settle_again(pool, "err-1"))
    assert st.unsettled is None
    assert [q for q, _ in conn.statements] == [Q.mark_published, Q.mark_retry] and conn.transactions == 1
    assert all(p["token"] == token for _, p in conn.statements)
    line = next(r for r in caplog.records if getattr(r, "event", None) == "settle retry")
    assert (line.errorId, line.events) == ("err-1", 2)


# ---- lock mode: marks that roll back with the claiming transaction (issue 25, case 2) --------------------


def lock_batch():
    rows = [Row(*raw(1, 1, 1)), Row(*raw(2, 1, 2, attempts=3)), Row(*raw(3, 1, 3))]
    return rows, BatchOutcome(delivered=[1, 3], retry={2: "x"})


def test_lock_mode_marks_that_fail_leave_the_batch_to_settle_before_the_next_claim(clock):
    st = make_settler(clock, OUTBOX_CLAIM_MODE="lock")
    rows, outcome = lock_batch()
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(st.write_outcome(FakeConn(fail_on=Q.mark_published_locked), None, rows, outcome))
    assert st.unsettled == Unsettled(None, rows, outcome)  # no transaction id: it cannot have committed


def test_lock_mode_marks_kept_until_the_commit_is_reported(clock):
    st = make_settler(clock, OUTBOX_CLAIM_MODE="lock")
    rows, outcome = lock_batch()
    result, retry_rows = asyncio.run(st.write_outcome(FakeConn(), None, rows, outcome))
    # Written in the open transaction: its commit may still fail.
    assert st.unsettled == Unsettled(None, rows, outcome, 7777, (result, retry_rows))
    st.after_settle(rows, outcome, retry_rows, result)  # committed
    assert st.unsettled is None


def test_lock_mode_batch_settled_again_marks_only_rows_as_the_claim_found_them(clock, caplog):
    caplog.set_level(logging.INFO, "kaireon_pub.worker")
    st = make_settler(clock, OUTBOX_CLAIM_MODE="lock")
    rows, outcome = lock_batch()
    st.scan.cursors = {1: (3, 3)}
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(st.write_outcome(FakeConn(fail_on=Q.mark_published_locked), None, rows, outcome))
    conn = FakeConn()
    published = value(metrics.PROCESSED.labels("published"))
    lost = value(metrics.LEASE_LOST)
    asyncio.run(st.settle_again(FakePool(conn), "err-2"))
    assert st.unsettled is None
    assert [q for q, _ in conn.statements] == [Q.mark_published_again, Q.mark_retry_again]
    assert conn.transactions == 1
    retry = conn.statements[1][1]
    assert (retry["ids"], retry["attempts"]) == ([2], [3])  # not retried twice if the first commit landed
    assert value(metrics.PROCESSED.labels("published")) == published + 2 and value(metrics.LEASE_LOST) == lost
    assert st.scan.cursors == {1: (2, 2)}  # the settled retry's later rows are scanned again
    line = next(r for r in caplog.records if getattr(r, "event", None) == "settle retry")
    assert (line.errorId, line.events, line.claimMode) == ("err-2", 3, "lock")


def test_lock_mode_batch_settled_again_counts_rows_another_claim_took_as_may_be_duplicated(clock):
    st = make_settler(clock, OUTBOX_CLAIM_MODE="lock", OUTBOX_DELETE_ON_PUBLISH="true")
    rows, outcome = lock_batch()
    st.unsettled = Unsettled(None, rows, BatchOutcome(delivered=[1, 3]))
    conn = FakeConn()

    async def delete(query, params=None):
        conn.statements.append((query, params))
        return FakeCursor(rowcount=1)  # one of the two is pending no more
    conn.execute = delete
    lost = value(metrics.LEASE_LOST)
    asyncio.run(st.settle_again(FakePool(conn), None))
    assert [q for q, _ in conn.statements] == [Q.delete_published_again]
    assert value(metrics.LEASE_LOST) == lost + 1 and st.unsettled is None


def test_lock_mode_settle_again_that_fails_keeps_the_batch(clock):
    st = make_settler(clock, OUTBOX_CLAIM_MODE="lock")
    rows, outcome = lock_batch()
    st.unsettled = Unsettled(None, rows, outcome)
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(st.settle_again(FakePool(FakeConn(), fail=1), None))
    assert st.unsettled == Unsettled(None, rows, outcome)


def written_batch(st: Settler):
    """A lock-mode batch whose marks were written and whose commit was not reported."""
    rows, outcome = lock_batch()
    asyncio.run(st.write_outcome(FakeConn(), None, rows, outcome))
    return rows, outcome


def test_lock_mode_batch_whose_commit_landed_is_settled_without_marks_or_lease_lost(clock):
    st = make_settler(clock, OUTBOX_CLAIM_MODE="lock")
    written_batch(st)
    conn = FakeConn()
    conn.xact_status = "committed"
    published, lost = value(metrics.PROCESSED.labels("published")), value(metrics.LEASE_LOST)
    asyncio.run(st.settle_again(FakePool(conn), None))
    assert [q for q, _ in conn.statements] == [Q.xact_status] and conn.statements[0][1] == {"xact": 7777}
    assert st.unsettled is None
    assert value(metrics.PROCESSED.labels("published")) == published + 2 and value(metrics.LEASE_LOST) == lost


def test_lock_mode_batch_whose_commit_did_not_land_is_marked_again(clock):
    st = make_settler(clock, OUTBOX_CLAIM_MODE="lock")
    written_batch(st)
    conn = FakeConn()  # the server: aborted
    asyncio.run(st.settle_again(FakePool(conn), None))
    assert [q for q, _ in conn.statements] == [Q.xact_status, Q.mark_published_again, Q.mark_retry_again]
    assert st.unsettled is None


def test_lock_mode_batch_whose_transaction_still_runs_waits(clock):
    st = make_settler(clock, OUTBOX_CLAIM_MODE="lock")
    rows, outcome = written_batch(st)
    conn = FakeConn()
    conn.xact_status = "in progress"
    with pytest.raises(TransientError, match="still open"):
        asyncio.run(st.settle_again(FakePool(conn), None))
    assert st.unsettled.rows == rows and [q for q, _ in conn.statements] == [Q.xact_status]


# ---- delete-on-publish in status mode: a delete whose reply was lost (issue 25, case 6b) ----------------


def deleted_batch(st: Settler, **conn):
    """A status-mode delete-on-publish batch (two delivered, one to retry) whose settle failed."""
    rows, outcome = lock_batch()
    token = uuid.uuid4()
    conn = FakeConn(**conn)
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(st.settle(FakePool(conn), token, rows, outcome))
    return conn, token, rows, outcome


def test_status_mode_delete_is_its_own_transaction_and_a_lost_commit_reply_keeps_its_id(clock):
    st = make_settler(clock, OUTBOX_DELETE_ON_PUBLISH="true")
    conn, token, rows, outcome = deleted_batch(st, fail_commit=True)
    assert [q for q, _ in conn.statements] == [Q.delete_published, Q.mark_retry, Q.current_xact]
    assert conn.transactions == 1
    result, retry_rows = st.unsettled.written
    assert st.unsettled == Unsettled(token, rows, outcome, 7777, (result, retry_rows))
    assert (result.published, result.lease_lost) == (2, 0)
    # All delivered: a transaction all the same, its commit apart from the delete.
    conn = FakeConn()
    asyncio.run(st.settle(FakePool(conn), token, rows[:1], BatchOutcome(delivered=[1])))
    assert [q for q, _ in conn.statements] == [Q.delete_published, Q.current_xact] and conn.transactions == 1
    assert st.unsettled is None


def test_status_mode_delete_whose_commit_landed_is_settled_without_lease_lost(clock, caplog):
    st = make_settler(clock, OUTBOX_DELETE_ON_PUBLISH="true")
    deleted_batch(st, fail_commit=True)
    conn = FakeConn()
    conn.xact_status = "committed"
    published, lost = value(metrics.PROCESSED.labels("published")), value(metrics.LEASE_LOST)
    retried = value(metrics.PROCESSED.labels("retried"))
    asyncio.run(st.settle_again(FakePool(conn), None))
    # Nothing deleted again (which would find the rows gone and count them lease lost): the server's word.
    assert [q for q, _ in conn.statements] == [Q.xact_status] and conn.statements[0][1] == {"xact": 7777}
    assert st.unsettled is None
    assert value(metrics.PROCESSED.labels("published")) == published + 2 and value(metrics.LEASE_LOST) == lost
    assert value(metrics.PROCESSED.labels("retried")) == retried + 1
    assert not [r for r in caplog.records if getattr(r, "event", None) == "lease lost"]


def test_status_mode_delete_whose_commit_did_not_land_is_made_again_with_its_token(clock):
    st = make_settler(clock, OUTBOX_DELETE_ON_PUBLISH="true")
    _, token, _, _ = deleted_batch(st, fail_commit=True)
    conn = FakeConn()  # the server: aborted
    asyncio.run(st.settle_again(FakePool(conn), None))
    assert [q for q, _ in conn.statements] == [Q.xact_status, Q.delete_published, Q.mark_retry, Q.current_xact]
    assert conn.statements[1][1]["token"] == token and conn.transactions == 1
    assert st.unsettled is None


def test_status_mode_delete_whose_own_reply_was_lost_is_made_again_without_asking(clock):
    # The delete's reply lost: its commit was never sent, so its transaction cannot have committed.
    st = make_settler(clock, OUTBOX_DELETE_ON_PUBLISH="true")
    _, token, rows, outcome = deleted_batch(st, fail_on=Q.delete_published)
    assert st.unsettled == Unsettled(token, rows, outcome)
    conn = FakeConn()
    lost = value(metrics.LEASE_LOST)
    asyncio.run(st.settle_again(FakePool(conn), None))
    assert [q for q, _ in conn.statements] == [Q.delete_published, Q.mark_retry, Q.current_xact]
    assert st.unsettled is None and value(metrics.LEASE_LOST) == lost


def test_status_mode_delete_whose_transaction_still_runs_waits(clock):
    st = make_settler(clock, OUTBOX_DELETE_ON_PUBLISH="true")
    _, _, rows, _ = deleted_batch(st, fail_commit=True)
    conn = FakeConn()
    conn.xact_status = "in progress"
    with pytest.raises(TransientError, match="still open"):
        asyncio.run(st.settle_again(FakePool(conn), None))
    assert st.unsettled.rows == rows and st.unsettled.xact == 7777
