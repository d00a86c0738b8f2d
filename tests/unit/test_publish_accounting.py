"""Publisher.publish's accounting of every event's fate, against a stand-in for librdkafka.

The stand-in serves delivery reports on the publisher's own delivery thread (from poll(), as
librdkafka does), and reports purged messages with _PURGE_QUEUE after a purge: every path of the
batch's bookkeeping (handed, reported, released, unconfirmed) without a broker."""

from __future__ import annotations

import asyncio
import queue
import time

import pytest
from confluent_kafka import KafkaError, KafkaException, Message

from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka import producer as producer_module
from kaireon_pub.worker.kafka.publisher import Publisher
from kaireon_pub.worker.rows import Row


class FakeProducer:
    """produce() decides each record's fate by its event id: `fates[id]` is "ok" (reported
    delivered), a KafkaError code (reported with that error), "hold" (never reported until a
    purge), an exception to raise, or a list of those, one per produce() attempt. A delivered
    record lands in partition 0 at the next offset of its topic."""

    def __init__(self, fates: dict):
        self.fates = fates
        self.reports: queue.Queue = queue.Queue()
        self.held: list = []
        self.produced: list[int] = []
        self.purges = 0
        self.purges_by_publish = 0
        self.served = 0  # reports served, by the delivery thread or serve_the_rest()
        self.next_offset: dict[str, int] = {}

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        event_id = int(dict(headers)["event-id"])
        fate = self.fates.get(event_id, "ok")
        if isinstance(fate, list):
            fate = fate.pop(0) if len(fate) > 1 else fate[0]
        if isinstance(fate, BaseException):
            raise fate
        self.produced.append(event_id)
        if fate == "hold":
            self.held.append(on_delivery)
        else:
            self.reports.put((on_delivery, None if fate == "ok" else KafkaError(fate), self.landed(topic)))

    def landed(self, topic: str) -> Message:
        """The message of a delivery report: the topic's next offset, in partition 0."""
        offset = self.next_offset.get(topic, 0)
        self.next_offset[topic] = offset + 1
        return Message(topic=topic, partition=0, offset=offset)

    def serve_the_rest(self) -> None:
        """Serve what is still queued (on the caller's thread, once the delivery thread stopped)."""
        while self.poll(0):
            pass

    def poll(self, timeout):
        try:
            callback, err, msg = self.reports.get(timeout=timeout)
        except queue.Empty:
            return 0
        callback(err, msg)
        self.served += 1
        return 1

    def purge(self, in_queue=True, in_flight=True, blocking=True):
        self.purges += 1
        for callback in self.held:
            self.reports.put((callback, KafkaError(KafkaError._PURGE_QUEUE), None))
        self.held.clear()

    def flush(self, timeout=None):
        return 0

    def __len__(self):
        return len(self.held)


def rows_for(keys: list[str | None]) -> list[Row]:
    now = time.time()
    return [Row(i, "accounting", key, b"{}", "{}", "test.event", 0, 0, 1000 + i, now,
                "2026-12-02T00:00:00.000000Z") for i, key in enumerate(keys, start=1)]


@pytest.fixture
def run(monkeypatch):
    """run(fates, keys, deadline_s) -> (outcome, fake producer)."""
    made: list[FakeProducer] = []

    def publish(fates: dict, keys: list[str | None], deadline_s: float = 30.0):
        fake = FakeProducer(fates)
        made.append(fake)
        monkeypatch.setattr(producer_module, "make_producer", lambda *args: fake)
        settings = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})

        async def main():
            pub = Publisher(settings, client_id="test-accounting")
            try:
                out = await pub.publish(rows_for(keys), True, time.monotonic() + deadline_s, lambda: float("inf"))
                fake.purges_by_publish = fake.purges  # close() purges too
                return out
            finally:
                await pub.close()
        return asyncio.run(main()), fake
    return publish


def test_every_event_reported_delivered(run):
    out, fake = run({}, ["a", "b", "a", None])
    assert sorted(out.delivered) == [1, 2, 3, 4] and len(out.ages) == 4
    # where each landed, from its own delivery report (the stand-in: produce order, partition 0)
    landed = sorted(zip(out.delivered, out.partitions, out.offsets, strict=True))
    assert landed == [(1, 0, 0), (2, 0, 1), (3, 0, 2), (4, 0, 3)]
    assert out.released == [] and out.unconfirmed == 0 and fake.purges_by_publish == 0
    assert not (out.rejected or out.retry or out.transient_error or out.producer_error)


def test_a_full_local_queue_is_waited_out(run):
    out, fake = run({2: [BufferError(), BufferError(), "ok"]}, ["a", "b", "c"])
    assert sorted(out.delivered) == [1, 2, 3] and fake.produced == [1, 2, 3]
    assert out.released == [] and not out.transient_error


def test_a_local_queue_that_stays_full_releases_the_rest_unhanded(run):
    out, fake = run({2: BufferError()}, ["a", "b", "c"], deadline_s=0.3)
    assert out.delivered == [1]
    assert out.transient_error == "librdkafka's local queue stayed full"
    assert out.released == [2, 3] and out.unconfirmed == 0  # neither reached librdkafka


def test_unreported_events_are_purged_released_and_counted_unconfirmed(run):
    out, fake = run({2: "hold", 4: "hold"}, ["a", "b", "c", "d"], deadline_s=0.3)
    assert sorted(out.delivered) == [1, 3]
    assert out.released == [2, 4] and out.unconfirmed == 2
    assert out.transient_error == "delivery not confirmed before the deadline"
    assert fake.purges_by_publish == 1
    # The purge reports the held records (_PURGE_QUEUE) after the batch was closed: they change nothing.
    fake.serve_the_rest()
    assert fake.served == 4
    assert sorted(out.delivered) == [1, 3] and out.released == [2, 4] and not out.rejected and not out.retry


def test_a_refused_event_holds_its_key_and_the_others_are_delivered(run):
    too_large = KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    out, fake = run({2: too_large}, ["a", "a", "b", "a"])
    assert sorted(out.delivered) == [1, 3]
    assert list(out.rejected) == [2] and out.rejected[2].startswith("MSG_SIZE_TOO_LARGE")
    assert out.released == [4] and out.unconfirmed == 0  # held back behind 2, never handed
    assert fake.produced == [1, 3]


def test_a_transient_report_releases_a_handed_event_as_unconfirmed(run):
    out, fake = run({2: KafkaError._MSG_TIMED_OUT}, ["a", "b", "c"])
    assert sorted(out.delivered) == [1, 3]
    assert sorted(zip(out.delivered, out.offsets, strict=True)) == [(1, 0), (3, 2)]  # 2 took offset 1 and failed: none
    assert out.released == [2] and out.unconfirmed == 1
    assert out.transient_error.startswith("_MSG_TIMED_OUT")
    assert fake.purges_by_publish == 0  # every handed record was reported


def test_a_producer_error_ends_the_batch_and_releases_what_was_not_tried(run):
    fenced = KafkaException(KafkaError(KafkaError._FENCED))
    out, fake = run({2: fenced}, ["a", "b", "c"])
    assert out.producer_error and out.producer_error.startswith("_FENCED")
    # The batch gives up at once: 1 is delivered if its report came first, else released unconfirmed.
    assert out.released[-2:] == [2, 3] and sorted(out.delivered + out.released) == [1, 2, 3]
    assert out.unconfirmed == (1 if 1 in out.released else 0)
    assert fake.produced == [1]
