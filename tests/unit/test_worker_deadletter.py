"""The dead-letter sweep (worker/deadletter.py) without services: the record a failed row becomes,
and the sweep's decisions (what it marks, what it produces again, when it sweeps, and which query)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time

from confluent_kafka import KafkaError

from kaireon_pub import metrics
from kaireon_pub.worker import deadletter
from kaireon_pub.worker.deadletter import DLQ, DeadLetters, dead_letter_record
from kaireon_pub.worker.rows import Row
from tests.unit.worker_fakes import Clock, FakeCursor, settings, value

NOW = datetime.datetime(2026, 12, 6, 12, 0, 0, 123456, tzinfo=datetime.UTC)
S = settings(OUTBOX_DEAD_LETTER_TOPIC="dlq", OUTBOX_MAX_PAYLOAD_BYTES="100")


def row(event_id: int = 7, *, payload: bytes | None = b'{"a":1}', headers: str = "{}", key: str | None = "k",
        key_bytes: bytes | None = None, topic: str = "orders", attempts: int = 1) -> Row:
    return Row(event_id, topic, key, payload, headers, "created", attempts, 3, 100, 0.0,
               "2026-12-06T11:00:00.000000Z", "{}", key_bytes)


def test_the_record_keeps_the_events_key_value_and_headers_and_names_where_it_failed():
    key, value_, headers = dead_letter_record(row(headers='{"trace": "x"}'), "TOPIC_EXCEPTION: bad", S, NOW)
    h = dict(headers)
    assert key == b"k" and value_ == b'{"a":1}'
    assert h["event-id"] == b"7" and h["event-type"] == b"created" and h["trace"] == b"x"
    assert h["kaireon-dlq-topic"] == b"orders" and h["kaireon-dlq-key"] == b"k"
    assert h["kaireon-dlq-attempts"] == b"1" and h["kaireon-dlq-error"] == b"TOPIC_EXCEPTION: bad"
    assert h["kaireon-dlq-at"] == b"2026-12-06T12:00:00.123456Z"
    assert "kaireon-dlq-truncated" not in h


def test_an_event_that_failed_for_its_size_leaves_its_value_out_marked_truncated():
    for error in ("MSG_SIZE_TOO_LARGE: Broker: Message size too large", "RECORD_LIST_TOO_LARGE: x"):
        _, value_, headers = dead_letter_record(row(), error, S, NOW)
        assert value_ is None and dict(headers)["kaireon-dlq-truncated"] == b"true"
    # Larger than OUTBOX_MAX_PAYLOAD_BYTES (a row written by plain SQL), whatever its error.
    _, value_, headers = dead_letter_record(row(payload=b"x" * 101), "POLICY_VIOLATION: no", S, NOW)
    assert value_ is None and dict(headers)["kaireon-dlq-truncated"] == b"true"
    _, value_, headers = dead_letter_record(row(payload=b"x" * 100), "POLICY_VIOLATION: no", S, NOW)
    assert value_ == b"x" * 100 and "kaireon-dlq-truncated" not in dict(headers)


def test_a_tombstone_a_binary_key_a_long_error_and_headers_that_failed_the_event():
    _, value_, headers = dead_letter_record(row(payload=None), "x", S, NOW)
    assert value_ is None and "kaireon-dlq-truncated" not in dict(headers)
    key, _, headers = dead_letter_record(row(key="\\x00ff", key_bytes=b"\x00\xff"), "é" * 900, S, NOW)
    assert key == b"\x00\xff" and dict(headers)["kaireon-dlq-key"] == b"\x00\xff"
    assert len(dict(headers)["kaireon-dlq-error"]) == deadletter.ERROR_BYTES
    _, _, headers = dead_letter_record(row(key=None), "x", S, NOW)
    assert "kaireon-dlq-key" not in dict(headers)
    # Headers that are not a JSON object are what failed it: the record names the event without them.
    _, _, headers = dead_letter_record(row(headers="[1]"), "headers must be a JSON object", S, NOW)
    assert [n for n, _ in headers][:2] == ["event-id", "created-at"]
    assert dict(headers)["kaireon-dlq-topic"] == b"orders"


def test_every_record_names_its_event_own_only_rows_too():
    own_only = row(42, headers='{"kaireon-headers": "own-only", "id": "abc"}')
    _, _, headers = dead_letter_record(own_only, "TOPIC_EXCEPTION: bad", S, NOW)
    assert "event-id" not in dict(headers), "an own-only row's record carries its own headers only"
    assert dict(headers)["kaireon-dlq-event-id"] == b"42"
    for failed in (row(7), row(7, headers="[1]")):
        assert dict(dead_letter_record(failed, "x", S, NOW)[2])["kaireon-dlq-event-id"] == b"7"


# ---- the sweep ------------------------------------------------------------------------------------


class FakeProducer:
    """A broker's batches: the records produced together (no await between them) are reported
    together, soon after: acknowledged unless the event id's fate says otherwise (an error code to
    report, "raise" for produce() raising BufferError, "silent" for no report). Fates the broker
    judges on the batch: "big" (too large with its value), "huge" (too large even without it): the
    whole batch is refused (MSG_SIZE_TOO_LARGE), every record of it."""

    def __init__(self, fates: dict[int, object] | None = None):
        self.fates = fates or {}
        self.produced: list[tuple] = []
        self.batch: list[tuple] = []
        self.headers: dict[int, dict] = {}

    def produce(self, topic, value_, key, headers, on_delivery):
        event_id = int(dict(headers)["kaireon-dlq-event-id"])
        fate = self.fates.get(event_id)
        if fate == "raise":
            raise BufferError("full")
        self.produced.append((topic, key, value_, event_id))
        self.headers[event_id] = dict(headers)  # the last record's
        self.batch.append((event_id, value_, on_delivery))
        if len(self.batch) == 1:
            asyncio.get_running_loop().call_soon(self.deliver)

    def deliver(self):
        batch, self.batch = self.batch, []
        fates = [(self.fates.get(event_id), value_) for event_id, value_, _ in batch]
        too_large = any(fate == "huge" or (fate == "big" and value_ is not None) for fate, value_ in fates)
        for (_, _, on_delivery), (fate, _) in zip(batch, fates, strict=True):
            if too_large:
                on_delivery(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
            elif fate not in (None, "silent", "big", "huge"):
                on_delivery(KafkaError(fate), None)
            elif fate != "silent":
                on_delivery(None, None)


class FakePublisher:
    def __init__(self, producer: FakeProducer):
        self.producer = producer
        self.broken: str | None = None


class FakeConn:
    def __init__(self, db: FakeDb):
        self.db = db

    async def execute(self, statement, params=None):
        self.db.sent.append((statement, params))
        if statement == DLQ.mark_dead_lettered:
            ids = [int(i) for i in params["ids"].strip("{}").split(",")]
            marked = [i for i in ids if i not in self.db.gone]
            self.db.marked += marked
            return FakeCursor([(i,) for i in marked])
        # The keyset cursor: updated_at stands in as the id here.
        due = [r for r in self.db.due if r[0] not in self.db.marked and r[0] > (params["after_id"] or 0)]
        return FakeCursor([tuple(r) + (self.db.errors.get(r.id, "TOPIC_EXCEPTION: bad"), r.id)
                           for r in due[:params["limit"]]])


class FakeDb:
    def __init__(self, due: list[Row], errors: dict[int, str] | None = None):
        self.due = due
        self.errors = errors or {}
        self.sent: list[tuple] = []
        self.marked: list[int] = []
        self.gone: set[int] = set()  # rows requeued or dead-lettered elsewhere before the mark

    @contextlib.asynccontextmanager
    async def connection(self):
        yield FakeConn(self)

    def queries(self) -> list[str]:
        names = {DLQ.dead_letter_due: "full", DLQ.dead_letter_due_recent: "recent", DLQ.mark_dead_lettered: "mark"}
        return [names[s] for s, _ in self.sent]


def sweeper(db: FakeDb, producer: FakeProducer, *, shards=(1, 2, 3), clock=None, failed=None) -> DeadLetters:
    publisher = FakePublisher(producer)
    counter = failed if failed is not None else [0.0]
    return DeadLetters(S, db, lambda: list(shards), lambda: publisher, clock=clock or Clock(),
                       failed_count=lambda: counter[0])


def test_a_sweep_marks_the_acknowledged_rows_only_and_produces_the_others_again_next_time():
    db = FakeDb([row(1), row(2), row(3), row(4)])
    producer = FakeProducer({2: KafkaError.MSG_SIZE_TOO_LARGE, 3: "raise"})
    sweep = sweeper(db, producer)
    errors_before, done_before = value(metrics.DEAD_LETTER_ERRORS), value(metrics.DEAD_LETTERED)
    assert asyncio.run(sweep.sweep([1, 2, 3], recent=False)) == "error"
    assert db.marked == [1, 4]
    assert value(metrics.DEAD_LETTERED) - done_before == 2
    assert value(metrics.DEAD_LETTER_ERRORS) - errors_before == 2
    assert value(metrics.DEAD_LETTER_WAITING) == 2
    assert {p[0] for p in producer.produced} == {"dlq"}
    # Refused for its size: produced again alone, then without its value; 3 raised, never produced.
    assert [(p[3], p[2]) for p in producer.produced] == [(1, b'{"a":1}'), (2, b'{"a":1}'), (4, b'{"a":1}'),
                                                         (2, b'{"a":1}'), (2, None)]
    # The fault gone: the next sweep produces the two again, and marks them.
    producer.fates = {}
    assert asyncio.run(sweep.sweep([1, 2, 3], recent=False)) == "done"
    assert db.marked == [1, 4, 2, 3] and value(metrics.DEAD_LETTER_WAITING) == 0


def test_a_record_not_reported_in_time_or_a_broken_producer_leaves_the_row_waiting():
    db = FakeDb([row(1), row(2)])
    sweep = sweeper(db, FakeProducer({1: "silent"}), clock=time.monotonic)
    sweep.wait_s = 0.05
    assert asyncio.run(sweep.sweep([1], recent=False)) == "error"
    assert db.marked == [2]
    db = FakeDb([row(1)])
    producer = FakeProducer()
    sweep = sweeper(db, producer)
    sweep.publisher().broken = "fenced"
    assert asyncio.run(sweep.sweep([1], recent=False)) == "error"
    assert db.marked == [] and producer.produced == []


def test_an_acknowledged_row_no_longer_waiting_at_the_mark_is_counted():
    db = FakeDb([row(1), row(2)])
    db.gone = {2}
    before = value(metrics.DEAD_LETTER_UNMARKED)
    assert asyncio.run(sweeper(db, FakeProducer()).sweep([1], recent=False)) == "done"
    assert db.marked == [1] and value(metrics.DEAD_LETTER_UNMARKED) - before == 1


def test_no_shards_no_query_and_a_full_batch_sweeps_again_at_once():
    db = FakeDb([row(i) for i in range(1, deadletter.BATCH + 2)])
    sweep = sweeper(db, FakeProducer(), shards=())
    assert asyncio.run(sweep.sweep([], recent=False)) == "done" and db.sent == []
    sweep = sweeper(db, FakeProducer())
    assert asyncio.run(sweep.once()) == 0.0, "a full batch: the next pass at once"
    assert asyncio.run(sweep.once()) == deadletter.WATCH_S
    assert len(db.marked) == deadletter.BATCH + 1 and db.queries() == ["full", "mark", "full", "mark"]


def test_when_it_sweeps_full_at_start_recent_after_failures_full_again_on_its_clock_or_new_shards():
    clock, failed, shards = Clock(), [0.0], [1, 2]
    db = FakeDb([])
    sweep = sweeper(db, FakeProducer(), shards=shards, clock=clock, failed=failed)
    run = lambda: asyncio.run(sweep.once())  # noqa: E731
    run()
    assert db.queries() == ["full"]
    run()
    assert db.queries() == ["full"], "nothing new: only a look in memory"
    failed[0] = 3.0  # this worker's settle failed rows
    run()
    assert db.queries() == ["full", "recent"]
    assert db.sent[-1][1]["lookback_s"] == deadletter.LOOKBACK_S and db.sent[-1][1]["shards"] == "{1,2}"
    shards.append(9)  # a shard acquired: its failed rows may be old
    run()
    assert db.queries() == ["full", "recent", "full"]
    clock.now += deadletter.FULL_S
    run()
    assert db.queries() == ["full", "recent", "full", "full"]


def test_an_error_brings_a_full_sweep_after_the_retry_pause():
    clock, failed = Clock(), [0.0]
    db = FakeDb([row(1)])
    producer = FakeProducer({1: KafkaError._MSG_TIMED_OUT})
    sweep = sweeper(db, producer, clock=clock, failed=failed)
    asyncio.run(sweep.once())
    assert db.queries() == ["full"] and sweep.full_due == clock.now + deadletter.RETRY_S
    asyncio.run(sweep.once())
    assert db.queries() == ["full"]
    clock.now += deadletter.RETRY_S
    producer.fates = {}
    asyncio.run(sweep.once())
    assert db.queries() == ["full", "full", "mark"] and db.marked == [1]
    # A sweep that raises (the database): logged by on_error, a full sweep RETRY_S later.
    assert sweep.on_error(OSError("gone")) == deadletter.WATCH_S
    assert sweep.full_due == clock.now + deadletter.RETRY_S


def test_off_unless_the_topic_is_set():
    class Worker:
        settings = settings()

    assert deadletter.start(Worker(), lambda: True) is None


def test_a_record_the_broker_refuses_with_its_batch_is_produced_alone_then_without_its_value():
    # Row 2 is too large for the dead-letter topic with its value: the broker refuses the whole batch.
    db = FakeDb([row(1), row(2), row(3)])
    producer = FakeProducer({2: "big"})
    assert asyncio.run(sweeper(db, producer).sweep([1], recent=False)) == "done"
    assert sorted(db.marked) == [1, 2, 3] and value(metrics.DEAD_LETTER_WAITING) == 0
    assert len(producer.produced) == 7 and producer.produced[:3] == [("dlq", b"k", b'{"a":1}', i) for i in (1, 2, 3)]
    assert producer.headers[2]["kaireon-dlq-truncated"] == b"true"
    assert "kaireon-dlq-truncated" not in producer.headers[1]
    # Each refused one again alone; row 2, refused alone, once more without its value (only row 2).
    assert producer.produced[3:] == [("dlq", b"k", b'{"a":1}', 1), ("dlq", b"k", b'{"a":1}', 2),
                                     ("dlq", b"k", None, 2), ("dlq", b"k", b'{"a":1}', 3)]


def test_rows_refused_even_alone_do_not_block_the_rows_behind_them():
    # A full batch of rows the topic refuses even without their values (keys too large), then two good ones.
    db = FakeDb([row(i) for i in range(1, deadletter.BATCH + 3)])
    producer = FakeProducer({i: "huge" for i in range(1, deadletter.BATCH + 1)})
    clock = Clock()
    sweep = sweeper(db, producer, clock=clock)
    errors_before = value(metrics.DEAD_LETTER_ERRORS)
    assert asyncio.run(sweep.once()) == 0.0, "a full batch: the walk goes on at once, past the refused rows"
    assert db.marked == [] and value(metrics.DEAD_LETTER_WAITING) == deadletter.BATCH
    assert value(metrics.DEAD_LETTER_ERRORS) - errors_before == deadletter.BATCH
    assert asyncio.run(sweep.once()) == deadletter.WATCH_S
    assert db.marked == [deadletter.BATCH + 1, deadletter.BATCH + 2], "the rows behind them dead-lettered"
    assert db.sent[-2][1]["after_id"] == deadletter.BATCH, "the second batch starts after the first's last row"
    assert value(metrics.DEAD_LETTER_WAITING) == deadletter.BATCH
    assert sweep.full_due == clock.now + deadletter.RETRY_S, "the walk had refusals: another one soon"
    clock.now += deadletter.RETRY_S
    producer.fates = {}  # the topic's limit raised: the next walk starts over at the oldest
    asyncio.run(sweep.once())
    assert db.sent[-2][1]["after_at"] is None and len(db.marked) == deadletter.BATCH + 2
    assert value(metrics.DEAD_LETTER_WAITING) == 0


def test_the_waiting_gauge_counts_every_refused_row_until_it_is_dead_lettered_or_gone():
    db = FakeDb([row(1)])
    producer = FakeProducer({1: "huge"})
    sweep = sweeper(db, producer)
    assert asyncio.run(sweep.sweep([1], recent=False)) == "error"
    assert value(metrics.DEAD_LETTER_WAITING) == 1
    # A recent walk that finds only row 2 (row 1 failed long ago) and dead-letters it: row 1 still waits.
    sweep.pool = FakeDb([row(2)])
    assert asyncio.run(sweep.sweep([1], recent=True)) == "done"
    assert value(metrics.DEAD_LETTER_WAITING) == 1
    # A recent walk refusing row 3 adds it; a whole full walk drops row 1 once it is gone (requeued).
    producer.fates[3] = "huge"
    sweep.pool = FakeDb([row(3)])
    assert asyncio.run(sweep.sweep([1], recent=True)) == "error"
    assert value(metrics.DEAD_LETTER_WAITING) == 2
    assert asyncio.run(sweep.sweep([1], recent=False)) == "error"
    assert value(metrics.DEAD_LETTER_WAITING) == 1 and sweep.waiting == {3}
