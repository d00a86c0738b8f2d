"""Today's Worker, pinned before it is split into parts: its constructor opens nothing, so these
tests build one and drive its cursors, busy rows, settle accounting and failure streak directly,
without PostgreSQL, a broker or the environment."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import psycopg
import pytest

from kaireon_pub import metrics
from kaireon_pub.errors import ExitCode, SystemicError, TransientError
from kaireon_pub.settings import Settings
from kaireon_pub.worker.leases import RebalanceResult
from kaireon_pub.worker.loop import Worker
from kaireon_pub.worker.publisher import BatchOutcome
from kaireon_pub.worker.rows import Row, TickResult

ENV = {"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}


def settings(**env) -> Settings:
    return Settings.from_env({**ENV, **{k: str(v) for k, v in env.items()}})


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakePublisher:
    def __init__(self):
        self.broken: str | None = None
        self.broken_cause: str | None = None

    def mark_broken(self, reason: str, cause: str) -> None:
        if self.broken is None:
            self.broken, self.broken_cause = reason, cause


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    return clock


def make_worker(**env) -> Worker:
    w = Worker(settings(**env), 0, uuid.uuid4(), lambda: None, [])
    w.publisher = FakePublisher()
    return w


def raw(event_id: int, shard: int, xid: int, *, topic: str | None = "t", key: str | None = "k",
        attempts: int | None = 0) -> tuple:
    """A claim's tuple: a Row's columns in order (a held row has no topic; a busy one keeps its attempts)."""
    return (event_id, topic, key, b"v", "{}", None, attempts, shard, xid, 0.0, "", "{}", None)


def value(metric) -> float:
    return metric._value.get()


# ---- cursors ----------------------------------------------------------------------------------


def test_take_claimed_orders_rows_and_moves_each_shard_cursor_past_every_row_looked_at(clock):
    w = make_worker(OUTBOX_BATCH_SIZE=10)
    rows = w._take_claimed([raw(5, 1, 20), raw(3, 1, 10), raw(9, 2, 7, topic=None, attempts=None)])
    assert [r.id for r in rows] == [3, 5]  # (xid, id) order; the held row is not claimed
    assert all(isinstance(r, Row) for r in rows)
    assert w.cursors == {1: (20, 5), 2: (7, 9)}  # past the held row too
    assert w.last_claim_full is False
    w._take_claimed([raw(1, 1, 15)])
    assert w.cursors[1] == (20, 5)  # a cursor never moves back by a claim


def test_take_claimed_full_batch_and_column_check(clock):
    w = make_worker(OUTBOX_BATCH_SIZE=2)
    w._take_claimed([raw(1, 1, 1), raw(2, 1, 2)])
    assert w.last_claim_full is True
    with pytest.raises(TypeError):
        w._take_claimed([raw(1, 1, 1) + ("extra",)])


def test_after_settle_rewinds_released_rows_and_rows_settled_after_a_retry(clock):
    w = make_worker()
    w.cursors = {1: (50, 50), 2: (50, 50), 3: (50, 50)}
    rows = [Row(*raw(10, 1, 10)), Row(*raw(20, 2, 20, attempts=2)), Row(*raw(30, 3, 30))]
    w._after_settle(rows, BatchOutcome(delivered=[20, 30], released=[10]), [], TickResult(claimed=3, published=2))
    assert w.cursors == {1: (10, 9), 2: (20, 20), 3: (50, 50)}


def test_apply_rescans_due_shards_then_full_rescan(clock):
    w = make_worker(OUTBOX_RESCAN_INTERVAL_MS=10_000)
    w.cursors = {1: (5, 5), 2: (6, 6)}
    w.rescan_at = {1: clock.now + 1, 2: clock.now + 5}
    w.busy = {1: {"k": (5, 5)}}
    clock.now += 2
    w._apply_rescans()
    assert w.cursors == {2: (6, 6)} and w.rescan_at == {2: clock.now + 3} and w.busy == {}
    w.busy = {2: {"k": (6, 6)}}
    clock.now += 10
    w._apply_rescans()
    assert w.cursors == {} and w.rescan_at == {} and w.busy == {}
    assert w.next_full_rescan == clock.now + 10


def test_on_leases_changed_forgets_cursors_of_shards_that_came_or_went(clock):
    w = make_worker()
    w.cursors = {1: (1, 1), 2: (2, 2), 3: (3, 3), 4: (4, 4)}
    w.rescan_at = {2: 1.0, 3: 1.0, 4: 1.0}
    w.busy = {1: {"k": (1, 1)}, 4: {"k": (4, 4)}}
    w._on_leases_changed(RebalanceResult(live_workers=1, released=[2], lost=[3]))
    assert w.cursors == {1: (1, 1), 4: (4, 4)} and w.rescan_at == {4: 1.0} and not w.shards_changed
    w._on_leases_changed(RebalanceResult(live_workers=1, acquired=[1]))
    assert w.cursors == {4: (4, 4)} and w.busy == {4: {"k": (4, 4)}} and w.shards_changed


def test_rotation_starts_each_claim_one_shard_further(clock):
    w = make_worker()
    w.leases.owned = {3: 1, 1: 1, 2: 1}
    assert [w._rotated_shards() for _ in range(3)] == [[2, 3, 1], [3, 1, 2], [1, 2, 3]]


# ---- rows another session locks ----------------------------------------------------------------


def test_note_busy_keeps_each_keys_first_busy_row_logs_once_and_rescans_soon(clock, caplog):
    w = make_worker(OUTBOX_ORDERING="strict")
    caplog.set_level(logging.WARNING, "kaireon_pub.worker")
    w._take_claimed([raw(8, 1, 8, topic=None, attempts=0), raw(4, 1, 4, topic=None, attempts=1, key="k")])
    assert w.busy == {1: {"k": (4, 4)}}
    assert w.rescan_at[1] == clock.now + 1.0 and w._careful()
    assert value(metrics.LOCKED_EVENTS) == 1
    w._note_busy([raw(4, 1, 4, topic=None, attempts=1)])  # met again: the same lock, no new line
    lines = [r for r in caplog.records if getattr(r, "event", None) == "event locked by another session"]
    assert [r.eventId for r in lines] == [4, 8]
    params = w._with_busy({"x": 1})
    assert (params["busy_keys"], params["busy_shards"]) == (["k"], "{1}")
    clock.now += 1.5
    w._apply_rescans()  # the shard's scan starts again: the busy rows are learnt afresh
    assert w.busy == {} and value(metrics.LOCKED_EVENTS) == 0
    assert w._careful()  # a while longer: the rescan meets them again
    clock.now += 3
    assert not w._careful()


def test_note_busy_relaxed_counts_the_key_flowing_past(clock):
    w = make_worker(OUTBOX_ORDERING="relaxed")
    before = value(metrics.ORDER_VIOLATIONS)
    w._note_busy([raw(7, 2, 7, topic=None, attempts=0), raw(9, 2, 9, topic=None, attempts=0, key=None)])
    assert value(metrics.ORDER_VIOLATIONS) == before + 1  # a NULL key holds nothing back


# ---- settle accounting ------------------------------------------------------------------------


def test_after_settle_counts_retries_failures_and_schedules_the_retry_rescan(clock):
    w = make_worker(OUTBOX_ORDERING="strict")
    result = TickResult(claimed=3, published=1)
    rows = [Row(*raw(i, 1, i)) for i in (1, 2, 3)]
    retried = value(metrics.PROCESSED.labels("retried"))
    w._after_settle(rows, BatchOutcome(delivered=[1], retry={2: "x"}, rejected={3: "bad"}),
                    [(2, "pending", 1, 2, 4.0), (3, "failed", 1, 3, 0.0)], result)
    assert (result.retried, result.failed, result.released) == (1, 1, 0)
    assert w.rescan_at[1] == pytest.approx(clock.now + 4.01)
    assert value(metrics.PROCESSED.labels("retried")) == retried + 1


def test_after_settle_counts_unconfirmed_and_lease_lost_and_raises_the_batch_error(clock, caplog):
    w = make_worker()
    unconfirmed, lost = value(metrics.UNCONFIRMED), value(metrics.LEASE_LOST)
    rows = [Row(*raw(i, 1, i)) for i in (1, 2, 3)]
    result = TickResult(claimed=3, published=1, lease_lost=1)
    with pytest.raises(TransientError, match="timed out"):
        w._after_settle(rows, BatchOutcome(delivered=[1, 2], released=[3], unconfirmed=1,
                                           transient_error="timed out"), [], result)
    assert result.released == 1
    assert value(metrics.UNCONFIRMED) == unconfirmed + 1 and value(metrics.LEASE_LOST) == lost + 1
    assert any(getattr(r, "event", None) == "lease lost" for r in caplog.records)
    with pytest.raises(SystemicError):
        w._after_settle(rows, BatchOutcome(delivered=[1], systemic_error="no topic"), [], TickResult())


def test_two_undelivered_batches_in_a_row_mark_the_producer_stalled(clock):
    w = make_worker()
    stalled = BatchOutcome(released=[1], transient_error="timed out")
    rows = [Row(*raw(1, 1, 1))]
    with pytest.raises(TransientError):
        w._after_settle(rows, stalled, [], TickResult())
    assert w.publisher.broken is None
    with pytest.raises(TransientError):
        w._after_settle(rows, stalled, [], TickResult())
    assert w.publisher.broken_cause == "stalled" and w.kafka_stalls == 0


def test_producer_error_marks_the_producer_broken(clock):
    w = make_worker()
    with pytest.raises(TransientError, match="producer must be recreated"):
        w._after_settle([], BatchOutcome(producer_error="fenced"), [], TickResult())
    assert (w.publisher.broken, w.publisher.broken_cause) == ("fenced", "producer")


# ---- the failure streak -------------------------------------------------------------------------


def test_streak_of_non_transient_failures_exits_3_and_transient_ones_back_off(clock, caplog):
    w = make_worker(OUTBOX_MAX_CONSECUTIVE_FAILURES=3, OUTBOX_POLL_INTERVAL_MS=100)
    caplog.set_level(logging.INFO, "kaireon_pub.worker")
    for _ in range(4):
        assert asyncio.run(w._tick_failed(TransientError("blip"))) is None
    assert w.streak == 0 and w._failure_backoff() == pytest.approx(1.6)
    assert asyncio.run(w._tick_failed(SystemicError("no topic"))) is None
    assert asyncio.run(w._tick_failed(psycopg.errors.UndefinedTable("x"))) is None
    error_id = w.last_error_id
    assert asyncio.run(w._tick_failed(RuntimeError("bug"))) == ExitCode.NON_TRANSIENT == 3
    failed = [r for r in caplog.records if getattr(r, "event", None) == "tick failed"]
    assert [r.consecutiveFailures for r in failed] == [0, 0, 0, 0, 1, 2, 3]
    assert failed[5].hint.startswith("the schema is missing")
    assert caplog.records[-1].event == "giving up" and w.last_error_id != error_id
    w._tick_succeeded()
    assert (w.streak, w.streak_transient, w.last_error_id) == (0, 0, None)
    assert [r.event for r in caplog.records][-1] == "tick recovered"
    assert w._failure_backoff() == pytest.approx(0.1)
