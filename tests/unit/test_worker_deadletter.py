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


# ---- the sweep ------------------------------------------------------------------------------------


class FakeProducer:
    """produce() reports at once: acknowledged unless the event id's fate says otherwise (an error
    code to report, "raise" for produce() raising BufferError, "silent" for no report)."""

    def __init__(self, fates: dict[int, object] | None = None):
        self.fates = fates or {}
        self.produced: list[tuple] = []

    def produce(self, topic, value_, key, headers, on_delivery):
        event_id = int(dict(headers)["event-id"])
        fate = self.fates.get(event_id)
        if fate == "raise":
            raise BufferError("full")
        self.produced.append((topic, key, value_, event_id))
        if fate == "silent":
            return
        on_delivery(None if fate is None else KafkaError(fate), None)


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
        due = [r for r in self.db.due if r[0] not in self.db.marked][:params["limit"]]
        return FakeCursor([tuple(r) + (self.db.errors.get(r.id, "TOPIC_EXCEPTION: bad"),) for r in due])


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
    assert [p[0] for p in producer.produced] == ["dlq", "dlq", "dlq"]
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
