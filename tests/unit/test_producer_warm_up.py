"""The warm-up before a batch's first produce() (worker/kafka/producer.py, ServedProducer.warm_up),
against a stand-in for librdkafka that records each metadata request: one request per topic the
producer was not asked about, never one for every topic, again after a recreate, bounded in time, and
never a failure of the batch. On a real broker: tests/integration/test_broker_watch.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kaireon_pub.worker.kafka import producer as producer_module
from kaireon_pub.worker.kafka.producer import ServedProducer
from kaireon_pub.worker.rows import Row
from tests.unit.test_kafka_producer import SETTINGS, Made, Stand


@pytest.fixture
def made(monkeypatch) -> Made:
    made = Made()
    monkeypatch.setattr(producer_module, "make_producer", made.make)
    return made


def rows_on(*topics: str) -> list[Row]:
    now = time.time()
    return [Row(i, topic, "k", b"{}", "{}", None, 0, 0, 1000 + i, now, "2026-12-06T00:00:00.000000Z")
            for i, topic in enumerate(topics, start=1)]


class Asked(Stand):
    """list_topics(topic, timeout) records its topic (None: every topic); `answer(topic, timeout)` may
    raise or block."""

    def __init__(self, answer=None):
        super().__init__()
        self.asked: list[str | None] = []
        self.answer = answer

    def list_topics(self, topic=None, timeout=-1):
        self.asked.append(topic)
        if self.answer is not None:
            self.answer(topic, timeout)
        return object()


def far() -> float:
    return time.monotonic() + 30


def test_each_topic_is_asked_about_once_per_producer_and_again_after_a_recreate(made: Made):
    made.queue.extend([Asked(), Asked()])

    async def main():
        served = ServedProducer(SETTINGS, "test-producer")
        first = served.producer
        try:
            await served.warm_up(rows_on("a", "a", "b"), far())
            await served.warm_up(rows_on("b", "a"), far())  # nothing new: no request
            await served.warm_up(rows_on("b", "c", "bad name!", ""), far())  # names Kafka refuses: not asked
            served.mark_broken("fenced", "producer")
            await served.recreate()
            await served.warm_up(rows_on("a", "c"), far())
        finally:
            await served.close()
        return first, served.producer

    first, second = asyncio.run(main())
    assert first is not second
    assert sorted(first.asked[:2]) == ["a", "b"] and first.asked[2:] == ["c"]
    assert sorted(second.asked) == ["a", "c"]  # the new producer knows nothing yet
    assert None not in first.asked + second.asked  # never a request for every topic


def test_a_warm_up_that_fails_or_hangs_does_not_fail_the_batch_and_ends_at_its_bound(made: Made, monkeypatch):
    released = threading.Event()

    def answer(topic, timeout):
        if topic == "broken":
            raise RuntimeError("no answer")
        released.wait(timeout)  # a broker that does not answer: list_topics blocks its whole timeout

    made.queue.append(Asked(answer))
    monkeypatch.setattr(producer_module, "WARM_UP_TIMEOUT_S", 0.3)

    async def main():
        served = ServedProducer(SETTINGS, "test-producer")
        try:
            started = time.monotonic()
            await served.warm_up(rows_on("broken"), far())  # raises inside: swallowed
            await served.warm_up(rows_on("slow-1", "slow-2", "slow-3"), far())
            took = time.monotonic() - started
            # A batch whose limit (its deadline, its lease) is nearer than the bound waits no longer.
            started = time.monotonic()
            await served.warm_up(rows_on("slow-4"), time.monotonic() + 0.05)
            limited = time.monotonic() - started
            await served.warm_up(rows_on("slow-1", "slow-2", "slow-3", "broken"), far())  # asked once only
        finally:
            released.set()
            await served.close()
        return served.producer, took, limited

    stand, took, limited = asyncio.run(main())
    assert took < 0.3 + 0.25  # three topics that hang share one bound, not one each
    assert limited < 0.05 + 0.2
    assert stand.asked[0] == "broken" and stand.asked[-1] == "slow-4"
    assert len(stand.asked) < 1 + 3 + 1 + 1  # at least one slow topic was left unasked when the bound passed
