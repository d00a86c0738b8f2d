"""kaireon_pub.devkafka: a real Apache Kafka broker (one node, and three in a KRaft quorum), a record
produced and read back, SASL_SSL with SCRAM-SHA-512 over TLS (a good and a wrong password), a leader
killed and its partitions led by another node, a node restarted empty. Skipped, with the reason, where
Java or Maven are missing (devkafka.unavailable())."""

from __future__ import annotations

import os
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tests.helpers import wait_for


def produce(config: dict[str, str], topic: str, value: bytes, timeout: float = 30) -> None:
    errors: list[KafkaError] = []
    producer = Producer(config | {"acks": "all", "enable.idempotence": True,
                                  "message.timeout.ms": str(int(timeout * 1000))})
    producer.produce(topic, value, key=b"k", on_delivery=lambda err, _msg: err and errors.append(err))
    assert producer.flush(timeout + 5) == 0, "the record is still queued"
    assert errors == [], errors


def read_values(config: dict[str, str], topic: str, n: int, timeout: float = 30) -> list[bytes]:
    """The first n records of the topic's partitions, read from offset 0 (assign, no group)."""
    consumer = Consumer(config | {"group.id": f"probe-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        values: list[bytes] = []

        def more() -> bool:
            values.extend(m.value() for m in consumer.consume(10, timeout=0.5) if m.error() is None)
            return len(values) >= n
        wait_for(more, timeout, f"{n} records on {topic}", interval=0)
        return values
    finally:
        consumer.close()


def create_topic(bootstrap: str, topic: str, partitions: int, replicas: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new_topic = NewTopic(topic, num_partitions=partitions, replication_factor=replicas)
    for future in admin.create_topics([new_topic]).values():
        future.result(30)


def test_a_single_broker_stores_what_is_produced_and_comes_back_empty_when_wiped(kafka_sasl):
    plain = {"bootstrap.servers": kafka_sasl.bootstrap}
    topic = f"dk-{uuid.uuid4().hex[:8]}"
    produce(plain, topic, b"hello")  # an auto-created topic
    assert read_values(plain, topic, 1) == [b"hello"]
    md = AdminClient(plain).list_topics(topic, timeout=10)
    assert len(md.topics[topic].partitions) == 4  # num.partitions, as Tansu's auto-created topics
    assert list(md.brokers) == kafka_sasl.node_ids == [1]
    assert kafka_sasl.leader_of(topic, 0) == 1

    pid = kafka_sasl.pid(1)
    kafka_sasl.restart_node(1, wipe=True)
    assert kafka_sasl.pid(1) != pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert topic not in AdminClient(plain).list_topics(timeout=10).topics
    # The SCRAM users are formatted in again.
    produce(kafka_sasl.sasl_client_config("kaireon"), topic, b"after")
    assert read_values(plain, topic, 1) == [b"after"]


def test_sasl_ssl_with_scram_publishes_and_a_wrong_password_is_refused(kafka_sasl):
    topic = f"dk-{uuid.uuid4().hex[:8]}"
    good = kafka_sasl.sasl_client_config("kaireon")
    assert good["bootstrap.servers"] == kafka_sasl.sasl_bootstrap != kafka_sasl.bootstrap
    assert good["ssl.ca.location"] == str(kafka_sasl.ca_file) and kafka_sasl.ca_file.exists()
    produce(good, topic, b"over tls")
    assert read_values(kafka_sasl.sasl_client_config("reader"), topic, 1) == [b"over tls"]

    bad = good | {"sasl.password": "not-" + kafka_sasl.users["kaireon"]}
    with pytest.raises(KafkaException) as refused:
        AdminClient(bad).list_topics(timeout=10)
    assert refused.value.args[0].code() in (KafkaError._AUTHENTICATION, KafkaError._TRANSPORT, KafkaError._TIMED_OUT)
    log = (kafka_sasl.workdir / "node-1" / "server.log").read_text(errors="replace")
    server_log = kafka_sasl.workdir / "node-1" / "server.log"
    wait_for(lambda: "Failed authentication" in server_log.read_text(errors="replace"),
             10, "the broker logging the failed authentication")
    assert kafka_sasl.users["kaireon"] not in log


def test_three_brokers_replicate_and_a_killed_leader_is_replaced(kafka_cluster):
    plain = {"bootstrap.servers": kafka_cluster.bootstrap}
    topic = f"dk-{uuid.uuid4().hex[:8]}"
    assert kafka_cluster.node_ids == [1, 2, 3]
    create_topic(kafka_cluster.bootstrap, topic, partitions=1, replicas=3)
    produce(plain, topic, b"one")
    md = AdminClient(plain).list_topics(topic, timeout=10)
    assert sorted(md.brokers) == [1, 2, 3]
    assert sorted(md.topics[topic].partitions[0].replicas) == [1, 2, 3]
    wait_for(lambda: len(AdminClient(plain).list_topics(topic, timeout=10).topics[topic].partitions[0].isrs) == 3,
             30, "three in-sync replicas")

    leader = kafka_cluster.leader_of(topic, 0)
    pid = kafka_cluster.pid(leader)
    kafka_cluster.kill_node(leader)
    try:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert leader not in kafka_cluster.running()
        wait_for(lambda: kafka_cluster.leader_of(topic, 0) not in (leader, -1), 60, "another leader")
        produce(plain, topic, b"two")  # min.insync.replicas=2 of the 2 left
        assert read_values(plain, topic, 2) == [b"one", b"two"]
    finally:
        kafka_cluster.start_node(leader)
    assert sorted(kafka_cluster.running()) == [1, 2, 3]
    wait_for(lambda: len(AdminClient(plain).list_topics(topic, timeout=10).topics[topic].partitions[0].isrs) == 3,
             60, "the restarted node back in sync")
