"""Publisher.publish's per-row decisions that span batches or topics, against the stand-in for
librdkafka of test_publish_accounting: strict order across topics (a key's later event is not
handed over while an earlier one of its key on another topic is unconfirmed: it waits for the
batch's next wave, or for the next claim when the earlier one failed), and a row whose
produce() raises twice retrying alone across the producer's recreate (issue 25, cases 3 and 5); a
record batch the broker refuses whole as too large, whose records become size suspects, each handed
over alone next time (against a stand-in that makes record batches as a broker sees them)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from confluent_kafka import KafkaError

from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka import producer as producer_module
from kaireon_pub.worker.kafka import publisher as publisher_module
from kaireon_pub.worker.kafka.publisher import Publisher
from kaireon_pub.worker.rows import Row
from tests.unit.test_publish_accounting import FakeProducer

SETTINGS = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})


def rows_of(events: list[tuple[str, str | None]]) -> list[Row]:
    """Rows 1, 2, … of (topic, key), in claim order."""
    now = time.time()
    return [Row(i, topic, key, b"{}", "{}", "test.event", 0, 0, 1000 + i, now, "2026-12-02T00:00:00.000000Z")
            for i, (topic, key) in enumerate(events, start=1)]


class RecordBatches(FakeProducer):
    """librdkafka and a broker that judges record batches, not records: the records handed over since
    the delivery thread last took some make one record batch; one that holds an event of `large` (too
    large for its topic) is refused whole: MSG_SIZE_TOO_LARGE for every record in it."""

    def __init__(self, large: set[int]):
        super().__init__({})
        self.large = large
        self.cond = threading.Condition()
        self.pending: list = []
        self.batches: list[list[int]] = []  # the record batches, as event ids

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        event_id = int(dict(headers)["event-id"])
        with self.cond:
            self.produced.append(event_id)
            self.pending.append((event_id, on_delivery, self.landed(topic)))
            self.cond.notify()

    def poll(self, timeout):
        with self.cond:
            self.cond.wait_for(lambda: self.pending, timeout)
            batch, self.pending = self.pending, []
        if not batch:
            return 0
        ids = [event_id for event_id, _, _ in batch]
        self.batches.append(ids)
        err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if self.large & set(ids) else None
        for _, callback, msg in batch:
            callback(err, msg if err is None else None)
        return len(batch)


@pytest.fixture
def publisher(monkeypatch):
    """publisher(fates) -> (run, fake): run(coroutine function of the Publisher) in one event loop.
    `fates` may be a stand-in producer itself."""
    def make(fates):
        fake = fates if isinstance(fates, FakeProducer) else FakeProducer(fates)
        monkeypatch.setattr(producer_module, "make_producer", lambda *args: fake)

        def run(body):
            async def main():
                pub = Publisher(SETTINGS, client_id="test-publisher")
                try:
                    return await body(pub)
                finally:
                    await pub.close()
            return asyncio.run(main())
        return run, fake
    return make


def publish(pub: Publisher, rows: list[Row], strict: bool = True):
    return pub.publish(rows, strict, time.monotonic() + 30, lambda: float("inf"))


def test_strict_a_keys_event_on_another_topic_waits_for_the_next_wave_with_the_rest_of_its_key(publisher):
    run, fake = publisher({})
    rows = rows_of([("a", "k"), ("a", "k"), ("b", "k"), ("a", "k"), ("b", "j"), ("a", "j"),
                    ("a", None), ("b", None), ("b", "m")])
    out = run(lambda pub: publish(pub, rows))
    # k went to a first: its event on b and every later one of k (even back on a) wait until what was
    # handed is reported; j went to b first, so its event on a waits; keyless events and other keys
    # go in the first wave. k changes topic twice: three waves.
    assert fake.produced == [1, 2, 5, 7, 8, 9, 3, 6, 4]
    assert sorted(out.delivered) == list(range(1, 10))
    assert out.released == [] and out.unconfirmed == 0
    assert not (out.rejected or out.retry or out.transient_error or out.producer_error)


def test_strict_a_wave_that_ends_at_the_deadline_releases_the_waiting_events_unhanded(publisher):
    run, fake = publisher({1: "hold"})
    rows = rows_of([("a", "k"), ("b", "k"), ("b", "j")])

    async def body(pub: Publisher):
        return await pub.publish(rows, True, time.monotonic() + 0.3, lambda: float("inf"))
    out = run(body)
    assert fake.produced == [1, 3] and out.delivered == [3]
    assert out.released == [1, 2] and out.unconfirmed == 1  # 1 was handed, 2 never was
    assert out.transient_error == "delivery not confirmed before the deadline"


def test_strict_an_event_failed_at_delivery_is_not_overtaken_on_another_topic(publisher):
    # The missing-topic case: the broker reports the first event's topic unknown after the batch
    # handed it over; the key's event on another topic must not have gone out meanwhile.
    run, fake = publisher({1: KafkaError.UNKNOWN_TOPIC_OR_PART})
    rows = rows_of([("missing", "k"), ("present", "k"), ("present", "j")])
    out = run(lambda pub: publish(pub, rows))
    assert fake.produced == [1, 3]
    assert list(out.retry) == [1] and out.retry[1].startswith("UNKNOWN_TOPIC_OR_PART")
    assert out.delivered == [3] and out.released == [2] and out.unconfirmed == 0  # for the next claim


def test_relaxed_hands_every_topic_over(publisher):
    run, fake = publisher({1: KafkaError.UNKNOWN_TOPIC_OR_PART})
    rows = rows_of([("missing", "k"), ("present", "k"), ("present", "j")])
    out = run(lambda pub: publish(pub, rows, strict=False))
    assert fake.produced == [1, 2, 3] and sorted(out.delivered) == [2, 3] and list(out.retry) == [1]
    assert out.released == []


def test_a_row_whose_produce_raises_twice_retries_alone_after_the_recreate(publisher):
    run, fake = publisher({2: RuntimeError("client bug")})
    rows = rows_of([("t", "a"), ("t", "b"), ("t", "b"), ("t", "c")])

    async def body(pub: Publisher):
        first = await publish(pub, rows)
        broken = pub.broken
        await pub.recreate()  # what the worker does on a producer error (worker/health.py)
        second = await publish(pub, rows)
        after_second = pub.broken
        third = await publish(pub, rows[1:])  # its next attempt: alone again, no recreate
        return first, broken, second, after_second, third, pub.broken
    first, broken, second, after_second, third, after_third = run(body)
    # The first raise: the client may be at fault; the producer is recreated, the batch released.
    assert first.producer_error == "produce raised RuntimeError: client bug" and broken == first.producer_error
    assert 2 in first.released and 3 in first.released
    # The second, on the new producer: the row is the cause; it retries alone, its key waits.
    assert second.producer_error is None and after_second is None
    assert list(second.retry) == [2] and second.retry[2] == "produce raised RuntimeError: client bug"
    assert sorted(second.delivered) == [1, 4] and second.released == [3]
    assert list(third.retry) == [2] and sorted(third.delivered) == [4] and after_third is None


def test_a_row_that_raised_once_does_not_stay_suspect_for_other_rows(publisher):
    run, fake = publisher({1: [RuntimeError("hiccup"), "ok"]})
    rows = rows_of([("t", "a"), ("t", "b")])

    async def body(pub: Publisher):
        first = await publish(pub, rows)
        await pub.recreate()
        return first, await publish(pub, rows)
    first, second = run(body)
    assert first.producer_error and sorted(second.delivered) == [1, 2] and not second.retry


# ---- a record batch refused whole as too large: size suspects -------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_a_record_batch_refused_as_too_large_releases_its_records_as_suspects_each_then_handed_alone(
        publisher, strict):
    broker = RecordBatches(large={4})
    run, _ = publisher(broker)
    rows = rows_of([("t", f"k{i % 3}") for i in range(1, 9)])

    async def body(pub: Publisher):
        first = await publish(pub, rows, strict)
        batches_before = len(broker.batches)
        second = await publish(pub, [r for r in rows if r.id in first.released], strict)
        return first, broker.batches[batches_before:], second
    first, second_batches, second = run(body)
    # The first publish: none is blamed; the records that shared 4's record batch are suspects.
    assert first.rejected == {} and first.retry == {} and 4 in first.suspects
    assert sorted(first.delivered + first.suspects) == list(range(1, 9)) and first.released == first.suspects
    assert first.unconfirmed == 0 and first.transient_error is None
    # The next: each suspect is a record batch of its own; 4, refused alone, is rejected.
    assert all(len(b) == 1 for b in second_batches) and [4] in second_batches
    assert list(second.rejected) == [4] and second.rejected[4].startswith("MSG_SIZE_TOO_LARGE")
    held = [r.id for r in rows if r.id in first.suspects and r.key == "k1" and r.id > 4] if strict else []
    assert sorted(second.delivered) == sorted(set(first.suspects) - {4} - set(held))
    assert second.released == held and second.suspects == [] and second.unconfirmed == 0


def test_a_batch_of_one_record_refused_as_too_large_is_rejected_at_once(publisher):
    run, _ = publisher(RecordBatches(large={1}))
    out = run(lambda pub: publish(pub, rows_of([("t", "k")])))
    assert list(out.rejected) == [1] and out.suspects == [] and out.released == []


def test_a_suspect_is_handed_alone_between_waves_of_the_others(publisher):
    broker = RecordBatches(large=set())
    run, _ = publisher(broker)
    rows = rows_of([("t", "a"), ("t", "b"), ("t", "c"), ("t", "d"), ("t", "e")])

    async def body(pub: Publisher):
        pub._size_suspects.update({3, 4})
        out = await publish(pub, rows)
        return out, set(pub._size_suspects)
    out, left = run(body)
    # 1 and 2 in a wave; 3 alone; 4 alone; 5 in the last wave. Delivered alone: no longer suspects.
    assert broker.batches[-3:-1] == [[3], [4]] and broker.batches[-1] == [5]
    assert {1, 2} == set(sum(broker.batches[:-3], []))
    assert sorted(out.delivered) == [1, 2, 3, 4, 5] and left == set()


def test_a_suspect_delivered_alone_is_delivered_and_its_key_follows(publisher):
    run, broker = publisher(RecordBatches(large=set()))
    rows = rows_of([("t", "k"), ("t", "k"), ("u", "k")])

    async def body(pub: Publisher):
        pub._size_suspects.add(1)
        return await publish(pub, rows)
    out = run(body)
    assert broker.batches[0] == [1] and broker.produced == [1, 2, 3]
    assert sorted(out.delivered) == [1, 2, 3] and out.released == [] and out.rejected == {}


def test_size_suspects_survive_a_recreate(publisher):
    broker = RecordBatches(large={2})
    run, _ = publisher(broker)
    rows = rows_of([("t", "a"), ("t", "b"), ("t", "c")])

    async def body(pub: Publisher):
        first = await publish(pub, rows)
        await pub.recreate()
        batches_before = len(broker.batches)
        second = await publish(pub, [r for r in rows if r.id in first.released])
        return first, second, broker.batches[batches_before:]
    first, second, batches = run(body)
    assert 2 in first.suspects and first.rejected == {}
    assert all(len(b) == 1 for b in batches) and list(second.rejected) == [2]


def test_size_suspects_are_bounded(publisher, monkeypatch):
    monkeypatch.setattr(publisher_module, "SIZE_SUSPECTS_KEPT", 4)
    broker = RecordBatches(large={1, 11})
    run, _ = publisher(broker)
    first_rows = rows_of([("t", f"k{i}") for i in range(1, 4)])
    second_rows = [r._replace(id=r.id + 10) for r in rows_of([("t", f"j{i}") for i in range(1, 3)])]

    async def body(pub: Publisher):
        await publish(pub, first_rows)
        after_first = set(pub._size_suspects)
        await publish(pub, second_rows)
        return after_first, set(pub._size_suspects)
    after_first, after_second = run(body)
    assert after_first == {1, 2, 3}
    assert after_second == {11, 12}  # 3 + 2 > 4: the older ones are forgotten
