"""The broker watch's request on a real broker (worker/health.py → Publisher.fetch_cluster_id):
the cluster id, every 5 s in every worker, without the metadata of every topic of the cluster."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from kaireon_pub.settings import Settings
from kaireon_pub.worker.publisher import Publisher
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
