"""The producer's keeping (worker/kafka/producer.py) against a stand-in for librdkafka: the
delivery thread, librdkafka's error callback, a producer marked broken, recreate and close.

How the worker decides a producer stalled (two undelivered batches in a row) is the loop's, not
tested here."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from confluent_kafka import KafkaError

from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka import producer as producer_module
from kaireon_pub.worker.kafka.delivery import Batch
from kaireon_pub.worker.kafka.producer import ServedProducer

SETTINGS = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})


class Stand:
    """poll() counts its calls, or raises `poll_error`; purge and flush are recorded."""

    def __init__(self, poll_error: Exception | None = None):
        self.poll_error = poll_error
        self.polls = 0
        self.polled = threading.Event()
        self.calls: list[str] = []
        self.on_error = None

    def poll(self, timeout):
        if self.poll_error is not None:
            raise self.poll_error
        self.polls += 1
        self.polled.set()
        time.sleep(min(timeout, 0.01))
        return 0

    def purge(self, in_queue=True, in_flight=True, blocking=True):
        self.calls.append("purge")

    def flush(self, timeout=None):
        self.calls.append("flush")
        return 0

    def __len__(self):
        return 3


class Made(list):
    """The stand-ins make_producer handed out, in order; the next ones are taken from `queue`."""

    def __init__(self):
        super().__init__()
        self.queue: list[Stand] = []

    def make(self, settings, client_id, on_error=None) -> Stand:
        stand = self.queue.pop(0) if self.queue else Stand()
        stand.on_error = on_error
        self.append(stand)
        return stand


@pytest.fixture
def made(monkeypatch) -> Made:
    made = Made()
    monkeypatch.setattr(producer_module, "make_producer", made.make)
    return made


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_delivery_thread_serves_the_producer_until_closed(made):
    async def main():
        served = ServedProducer(SETTINGS, "test-producer")
        stand = served.producer
        assert await asyncio.to_thread(stand.polled.wait, 5)
        assert served._thread.name == "test-producer-delivery" and served._thread.daemon
        assert served.queue_depth() == 3
        await served.close()
        return served, stand
    served, stand = asyncio.run(main())
    assert not served._thread.is_alive() and stand.calls == ["purge", "flush"] and served.broken is None


def test_a_poll_that_raises_marks_the_producer_broken(made):
    made.queue.append(Stand(poll_error=RuntimeError("client gone")))
    served = ServedProducer(SETTINGS, "test-producer")
    wait_until(lambda: served.broken is not None)
    assert served.broken == "poll raised RuntimeError: client gone" and served.broken_cause == "exception"
    served._thread.join(5)
    assert not served._thread.is_alive()  # the thread stops serving a client that raises


def test_mark_broken_keeps_the_first_reason_and_wakes_every_waiting_batch(made):
    async def main():
        served = ServedProducer(SETTINGS, "test-producer")
        batches = [Batch(asyncio.get_running_loop()) for _ in range(2)]
        served._open.update(batches)
        served.mark_broken("fenced", "producer")
        served.mark_broken("later", "stalled")
        await asyncio.wait_for(asyncio.gather(*(b.done for b in batches)), 5)
        await served.close()
        return served
    served = asyncio.run(main())
    assert (served.broken, served.broken_cause) == ("fenced", "producer")


@pytest.mark.parametrize(("error", "level", "broken"), [
    (KafkaError(KafkaError._FATAL, "fatal idempotence", fatal=True), logging.ERROR, True),
    (KafkaError(KafkaError._ALL_BROKERS_DOWN, "3/3 brokers are down"), logging.WARNING, False),
    (KafkaError(KafkaError._TRANSPORT, "connection refused"), logging.DEBUG, False),
])
def test_librdkafkas_error_callback(made, caplog, error, level, broken):
    served = ServedProducer(SETTINGS, "test-producer")
    with caplog.at_level(logging.DEBUG, logger="kaireon_pub.worker.publisher"):
        served.producer.on_error(error)  # as librdkafka calls it, on the delivery thread
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "kafka error"]
    assert line.name == "kaireon_pub.worker.publisher" and line.levelno == level
    assert line.kafkaError == error.name() and line.fatal is error.fatal()
    assert line.getMessage() == f"librdkafka error: {error.name()}: {error.str()}"
    if broken:
        assert (served.broken, served.broken_cause) == (f"{error.name()}: {error.str()}", "fatal")
    else:
        assert served.broken is None
    asyncio.run(served.close())


def test_recreate_makes_a_new_producer_and_disposes_of_the_old_one(made):
    async def main():
        served = ServedProducer(SETTINGS, "test-producer")
        old, old_thread = served.producer, served._thread
        served.mark_broken("fenced", "producer")
        await served.recreate()
        assert served.producer is made[1] and served.producer is not old
        assert served.broken is None and served.broken_cause is None
        assert not old_thread.is_alive() and old.calls == ["purge", "flush"]
        assert await asyncio.to_thread(served.producer.polled.wait, 5)  # the new one is served
        await served.close()
    asyncio.run(main())
    assert len(made) == 2


class Mortal(Stand):
    """A stand-in that records the thread it was destroyed on (librdkafka's destroy can block)."""

    destroyed_on: list[str] = []

    def __del__(self):
        Mortal.destroyed_on.append(threading.current_thread().name)


def test_recreate_destroys_the_old_producer_off_the_event_loop(monkeypatch):
    Mortal.destroyed_on = []
    monkeypatch.setattr(producer_module, "make_producer", lambda *args: Mortal())  # no reference kept

    async def main():
        served = ServedProducer(SETTINGS, "test-producer")
        await served.recreate()
        destroyed = list(Mortal.destroyed_on)
        await served.close()
        return destroyed
    loop_thread = threading.current_thread().name
    destroyed = asyncio.run(main())
    assert len(destroyed) == 1 and destroyed[0] != loop_thread


def test_a_missing_topic_is_called_missing_after_a_second_unless_the_operator_says_otherwise(monkeypatch):
    configs: list[dict] = []

    class Recording:
        def __init__(self, config):
            configs.append(config)
    monkeypatch.setattr(producer_module, "Producer", Recording)
    producer_module.make_producer(SETTINGS, "test-producer")
    own = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                             "KAFKA_TOPIC_METADATA_PROPAGATION_MAX_MS": "30000"})
    producer_module.make_producer(own, "test-producer")
    assert [c["topic.metadata.propagation.max.ms"] for c in configs] == ["1000", "30000"]
