"""The broker watch's request on a real broker (worker/health.py → Publisher.fetch_cluster_id):
the cluster id, every 5 s in every worker, without the metadata of every topic of the cluster; and
the producer's warm-up before a batch (producer.py, warm_up): one topic per request, once per topic."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

import pytest

from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka.publisher import Publisher
from kaireon_pub.worker.rows import Row
from tests import helpers


def test_the_cluster_id_is_read_without_asking_for_every_topic(broker, caplog):
    """list_topics() asked for all topics: on a cluster of thousands, a large response every 5 s per
    worker. librdkafka's own debug lines say which metadata request went out."""
    settings = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                                  "KAFKA_DEBUG": "metadata"})
    caplog.set_level(logging.DEBUG, "kaireon_pub.librdkafka")
    publisher = Publisher(settings, "watch-test")
    try:
        first = publisher.fetch_cluster_id(5.0)
        assert first and publisher.fetch_cluster_id(5.0) == first
        helpers.wait_for(lambda: any("describe cluster" in r.getMessage() or "application requested" in r.getMessage()
                                     for r in caplog.records), 5, "librdkafka's line for the watch's request")
    finally:
        asyncio.run(publisher.close())
    requests = [r.getMessage() for r in caplog.records if "Request metadata" in r.getMessage()]
    assert not [line for line in requests if "all topics" in line], requests


def test_a_broker_that_does_not_answer_fails_the_watch_within_its_timeout():
    """What kaireon_outbox_broker_up reads 0 from (worker/health.py): the request, not a cache."""
    settings = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    publisher = Publisher(settings, "watch-test")
    started = time.monotonic()
    try:
        with pytest.raises(Exception):  # noqa: B017, PT011 - whatever librdkafka raises, the watch catches it
            publisher.fetch_cluster_id(1.0)
    finally:
        asyncio.run(publisher.close())
    assert time.monotonic() - started < 5


def test_the_warm_up_asks_for_each_new_topic_once_and_never_for_every_topic(broker, caplog):
    """The warm-up before a batch's first produce() (producer.py, warm_up: the cold start's first event
    waited ~1 s against Tansu without it): one metadata request per topic the producer was not asked
    about, again after a recreate. Counted as librdkafka's answers to application requests, by the topic
    each names (a request is logged again when librdkafka re-sends it to another broker); a request of
    our own for a sentinel topic, made after the warm-ups, is answered after theirs."""
    settings = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                                  "KAFKA_DEBUG": "metadata"})
    caplog.set_level(logging.DEBUG, "kaireon_pub.librdkafka")
    now = time.time()
    rows = lambda *topics: [Row(i, t, "k", b"{}", "{}", None, 0, 0, 1000 + i, now, "2026-12-06T00:00:00.000000Z")  # noqa: E731
                            for i, t in enumerate(topics, start=1)]
    base = f"warm-{uuid.uuid4().hex[:8]}"
    a, b, c = f"{base}-a", f"{base}-b", f"{base}-c"

    def answered() -> list[str]:
        """The topic named by each answer to an application request (list_topics), in order."""
        topics, reason = [], ""
        for line in (r.getMessage() for r in caplog.records):
            if "===== Received metadata" in line:
                reason = line
            elif "application requested" in reason and (found := re.search(r"  Topic (\S+) with", line)):
                topics.append(found.group(1))
                reason = ""  # one topic per request
        return topics

    def asked_until(sentinel: str, publisher: Publisher) -> list[str]:
        publisher.producer.list_topics(sentinel, timeout=5)
        helpers.wait_for(lambda: sentinel in answered(), 10, "the answer to the sentinel's request")
        return answered()

    publisher = Publisher(settings, "warm-test")
    try:
        async def warm_twice():
            for _ in range(2):  # the second time: nothing new
                await publisher.warm_up(rows(a, a, b, "not a topic!"), time.monotonic() + 5)
            await publisher.warm_up(rows(b, c), time.monotonic() + 5)
        asyncio.run(warm_twice())
        first = asked_until(f"{base}-sentinel-1", publisher)
        asyncio.run(publisher.recreate())
        asyncio.run(publisher.warm_up(rows(a, b), time.monotonic() + 5))
        second = asked_until(f"{base}-sentinel-2", publisher)[len(first):]
    finally:
        asyncio.run(publisher.close())
    assert sorted(first[:2]) == [a, b] and first[2:] == [c, f"{base}-sentinel-1"], first
    assert sorted(second[:2]) == [a, b] and second[2:] == [f"{base}-sentinel-2"], second  # the new producer
    requests = [r.getMessage() for r in caplog.records if "Request metadata" in r.getMessage()]
    assert not [line for line in requests if "all topics" in line], requests
