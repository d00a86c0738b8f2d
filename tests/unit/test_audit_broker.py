"""RecordReader.compacted (kaireon_pub/audit/broker.py) without a broker: a topic's cleanup.policy
read through the admin API, and a broker that will not describe it (an ACL without DescribeConfigs)."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException

from kaireon_pub.audit.broker import RecordReader


class FakeAdmin:
    def __init__(self, answer):
        self.answer = answer
        self.asked = 0

    def describe_configs(self, resources, request_timeout):
        self.asked += 1
        futures = {}
        for resource in resources:
            future: Future = Future()
            if isinstance(self.answer, Exception):
                future.set_exception(self.answer)
            else:
                future.set_result({"cleanup.policy": SimpleNamespace(value=self.answer)})
            futures[resource] = future
        return futures


@pytest.fixture
def reader():
    with RecordReader({"bootstrap.servers": "127.0.0.1:9", "log_level": "0"}) as made:
        yield made


@pytest.mark.parametrize(("policy", "compacted"), [("compact", True), ("compact,delete", True),
                                                    ("delete, compact", True), ("delete", False), ("", False)])
def test_a_topic_is_compacted_when_its_cleanup_policy_includes_compact(reader, policy, compacted):
    reader._admin = FakeAdmin(policy)
    assert reader.compacted("orders") is compacted


def test_a_broker_that_will_not_describe_the_topic_leaves_it_not_compacted_logged_once(reader, caplog):
    reader._admin = FakeAdmin(KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)))
    with caplog.at_level(logging.WARNING, logger="kaireon_pub.audit.broker"):
        assert reader.compacted("orders") is False
        assert reader.compacted("orders") is False
    lines = [r for r in caplog.records if getattr(r, "event", None) == "audit policy unknown"]
    assert len(lines) == 1 and lines[0].topic == "orders" and "DescribeConfigs" in lines[0].getMessage()


def test_any_other_failure_is_raised(reader):
    reader._admin = FakeAdmin(KafkaException(KafkaError(KafkaError._TIMED_OUT)))
    with pytest.raises(KafkaException):
        reader.compacted("orders")
