"""Publisher.publish's per-row decisions that span batches or topics, against the stand-in for
librdkafka of test_publish_accounting: strict order across topics (a key's later event is not
handed over while an earlier one of its key on another topic is unconfirmed: it waits for the
batch's next wave, or for the next claim when the earlier one failed), and a row whose
produce() raises twice retrying alone across the producer's recreate (issue 25, cases 3 and 5)."""

from __future__ import annotations

import asyncio
import time

import pytest
from confluent_kafka import KafkaError

from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka import producer as producer_module
from kaireon_pub.worker.kafka.publisher import Publisher
from kaireon_pub.worker.rows import Row
from tests.unit.test_publish_accounting import FakeProducer

SETTINGS = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})


def rows_of(events: list[tuple[str, str | None]]) -> list[Row]:
    """Rows 1, 2, … of (topic, key), in claim order."""
    now = time.time()
    return [Row(i, topic, key, b"{}", "{}", "test.event", 0, 0, 1000 + i, now, "2026-12-02T00:00:00.000000Z")
            for i, (topic, key) in enumerate(events, start=1)]


@pytest.fixture
def publisher(monkeypatch):
    """publisher(fates) -> (run, fake): run(coroutine function of the Publisher) in one event loop."""
    def make(fates: dict):
        fake = FakeProducer(fates)
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
