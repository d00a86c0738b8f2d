"""The dead-letter topic (OUTBOX_DEAD_LETTER_TOPIC, worker/deadletter.py), against a real Apache Kafka
(`kafka_broker`): its max.message.bytes is what refuses the large event, and what refuses the
dead-letter records in the fault test.

- An event too large for its topic (created with max.message.bytes=8000: the broker judges it) and
  one with an invalid topic name each leave exactly one dead-letter record, read back by a consumer:
  key, headers, the value (none, marked truncated, for the large one); their rows have
  dead_lettered_at; every other event, of every key, is published in order.
- The dead-letter topic refusing every record at first (its max.message.bytes=100): the failed row
  stays not dead-lettered, the refusal is logged with an errorId and counted, the waiting gauge
  names it; once the topic accepts them (max.message.bytes raised), it is dead-lettered: nothing lost.
- A dead-letter record too large for the dead-letter topic (max.message.bytes=2000) while others
  share its batch (the broker refuses the batch whole): the others land with their values, it lands
  alone without its value (kaireon-dlq-truncated), and one too large even so (its headers, carried along)
  waits, logged and in the gauge, blocking no other.
"""

from __future__ import annotations

import collections
import os
import uuid
from typing import Any

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from kaireon_pub import Event
from tests.helpers import (
    TopicReader,
    commit,
    create_led_topic,
    event_ids,
    metric_value,
    status_counts,
    tier_env,
    wait_for,
)

pytestmark = pytest.mark.not_via_pgbouncer("the broker's answers are the subject; these tests run once, directly")


@pytest.fixture(scope="module")
def admin(kafka_broker) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_broker.bootstrap, "log_level": 0})


def create_topic(admin: AdminClient, name: str, **config: str) -> str:
    """One partition, replicated as widely as the broker allows (up to 3)."""
    return create_led_topic(admin, name, 1, **config)


def set_max_message_bytes(admin: AdminClient, name: str, value: str) -> None:
    entry = ConfigEntry("max.message.bytes", value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def insert_invalid_topic(db_url: str, key: str) -> int:
    """A row whose topic Kafka cannot accept: enqueue() would take it too, plain SQL is shorter."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
                            "VALUES ('not a topic!', %s, '{\"bad\": true}') RETURNING id", (key,)).fetchone()[0]


def rows(db_url: str, ids: list[int]) -> dict[int, dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        found = conn.execute("SELECT id, status, attempts, last_error, dead_lettered_at, payload::text "
                             "FROM outbox_events WHERE id = ANY(%s)", (ids,)).fetchall()
    return {r[0]: dict(zip(("status", "attempts", "last_error", "dead_lettered_at", "payload"), r[1:], strict=True))
            for r in found}


def dead_lettered(db_url: str, ids: list[int]) -> bool:
    return all(r["dead_lettered_at"] is not None for r in rows(db_url, ids).values())


def test_a_too_large_and_an_invalid_topic_event_each_leave_one_dead_letter_record_while_every_key_flows(
        db_url, kafka_broker, admin, tmp_path, run_tier):
    suffix = uuid.uuid4().hex[:8]
    topic = create_topic(admin, f"dl-main-{suffix}", **{"max.message.bytes": "8000"})
    dlq = create_topic(admin, f"dl-dlq-{suffix}")
    tier = run_tier(tier_env(db_url, kafka_broker.bootstrap, tmp_path, OUTBOX_DEAD_LETTER_TOPIC=dlq))
    before = commit(db_url, [Event(topic, f"k{i % 4}", {"i": i}) for i in range(20)])
    # Random hex: lz4 (the producer's compression) leaves it near its 16 kB, above the topic's 8000.
    large = commit(db_url, [Event(topic, "k-large", {"blob": os.urandom(8_000).hex()})])[0]
    invalid = insert_invalid_topic(db_url, "k0")
    after = commit(db_url, [Event(topic, k, {"after": i}) for i in range(5) for k in ("k0", "k1", "k-large")])
    wait_for(lambda: dead_lettered(db_url, [large, invalid]), 60, "both failed events dead-lettered")

    wait_for(lambda: status_counts(db_url) == {"published": 35, "failed": 2}, 30, "every other event published")
    with TopicReader(kafka_broker.bootstrap, topic) as reader:
        published = reader.read_until(lambda msgs: set(before + after) <= set(event_ids(msgs)), 30)
    by_key: dict[bytes, list[int]] = collections.defaultdict(list)
    for message in published:
        by_key[message.key()].append(int(dict(message.headers())["event-id"]))
    assert all(ids == sorted(ids) for ids in by_key.values()), "every key in order"
    assert sorted(event_ids(published)) == sorted(before + after), "every other event once; the failed ones not"

    with TopicReader(kafka_broker.bootstrap, dlq) as reader:
        records = reader.read_until(lambda msgs: {large, invalid} <= set(event_ids(msgs)), 30)
    assert sorted(event_ids(records)) == sorted([large, invalid]), "exactly one dead-letter record each"
    state = rows(db_url, [large, invalid])
    for record in records:
        headers = dict(record.headers())
        event_id = int(headers["event-id"])
        row = state[event_id]
        assert row["status"] == "failed"
        assert headers["kaireon-dlq-attempts"] == b"%d" % row["attempts"]
        assert headers["kaireon-dlq-error"].decode() == row["last_error"][:1000]
        assert headers["kaireon-dlq-at"] and headers["created-at"]
        if event_id == large:
            assert record.key() == b"k-large" and headers["kaireon-dlq-key"] == b"k-large"
            assert headers["kaireon-dlq-topic"] == topic.encode()
            assert headers["kaireon-dlq-truncated"] == b"true" and record.value() is None
            assert row["last_error"].startswith("MSG_SIZE_TOO_LARGE"), row["last_error"]
        else:
            assert record.key() == b"k0" and headers["kaireon-dlq-topic"] == b"not a topic!"
            assert "kaireon-dlq-truncated" not in headers
            assert record.value() == row["payload"].encode(), "the event's value, byte for byte"
            assert "TOPIC_EXCEPTION" in row["last_error"], row["last_error"]
    assert metric_value(tier.http_port(), "kaireon_outbox_dead_lettered_total") == 2
    assert not metric_value(tier.http_port(), "kaireon_outbox_dead_letter_errors_total")
    assert tier.stop() == 0


def test_a_dead_letter_topic_that_refuses_the_records_at_first_loses_nothing(
        db_url, kafka_broker, admin, tmp_path, run_tier):
    suffix = uuid.uuid4().hex[:8]
    topic = create_topic(admin, f"dl-main-{suffix}")
    dlq = create_topic(admin, f"dl-dlq-{suffix}", **{"max.message.bytes": "100"})  # smaller than any record
    tier = run_tier(tier_env(db_url, kafka_broker.bootstrap, tmp_path, OUTBOX_DEAD_LETTER_TOPIC=dlq))
    port = tier.http_port()
    invalid = insert_invalid_topic(db_url, "k-bad")
    flowing = commit(db_url, [Event(topic, f"k{i % 3}", {"i": i}) for i in range(10)])
    refused = tier.wait_log(lambda e: e.get("event") == "dead letter failed", 30, "a dead-letter refusal logged")
    assert refused["errorId"] and refused["eventId"] == invalid and "MSG_SIZE_TOO_LARGE" in refused["error"]
    assert (metric_value(port, "kaireon_outbox_dead_letter_errors_total") or 0) >= 1
    assert metric_value(port, "kaireon_outbox_dead_letter_waiting") == 1
    assert rows(db_url, [invalid])[invalid]["dead_lettered_at"] is None
    # The producer the dead-letter records share keeps publishing the outbox while they are refused.
    flowing += commit(db_url, [Event(topic, f"k{i % 3}", {"later": i}) for i in range(10)])
    wait_for(lambda: status_counts(db_url) == {"published": 20, "failed": 1}, 30, "every other event flows meanwhile")
    assert rows(db_url, [invalid])[invalid]["dead_lettered_at"] is None

    set_max_message_bytes(admin, dlq, "1000000")  # the fault gone
    wait_for(lambda: dead_lettered(db_url, [invalid]), 30, "the refused record produced again and marked")
    with TopicReader(kafka_broker.bootstrap, dlq) as reader:
        records = reader.read_until(lambda msgs: invalid in event_ids(msgs), 30)
    assert event_ids(records) == [invalid]
    assert metric_value(port, "kaireon_outbox_dead_lettered_total") == 1
    assert metric_value(port, "kaireon_outbox_dead_letter_waiting") == 0
    with TopicReader(kafka_broker.bootstrap, topic) as reader:
        assert sorted(event_ids(reader.read_until(lambda msgs: set(flowing) <= set(event_ids(msgs)), 30))) == flowing
    assert tier.stop() == 0


def insert_failing(conn: psycopg.Connection, key: str, payload: str, headers: str = "{}") -> int:
    return conn.execute("INSERT INTO outbox_events (topic, partition_key, payload, headers) "
                        "VALUES ('not a topic!', %s, %s, %s) RETURNING id", (key, payload, headers)).fetchone()[0]


def test_a_dead_letter_record_too_large_for_the_dead_letter_topic_blocks_none_of_the_others(
        db_url, kafka_broker, admin, tmp_path, run_tier):
    suffix = uuid.uuid4().hex[:8]
    dlq = create_topic(admin, f"dl-dlq-{suffix}", **{"max.message.bytes": "2000"})
    tier = run_tier(tier_env(db_url, kafka_broker.bootstrap, tmp_path, OUTBOX_DEAD_LETTER_TOPIC=dlq))
    port = tier.http_port()
    # One transaction: they fail in one settle and are dead-lettered together, in one record batch.
    # Random hex: lz4 leaves it near its size, above the dead-letter topic's 2000. The record too
    # large even without its value carries the event's own headers (2,500 bytes of them): a key
    # cannot be that large (outbox_events_partition_key_length: 1,024 bytes).
    with psycopg.connect(db_url) as conn:
        small = [insert_failing(conn, f"k{i}", f'{{"small": {i}}}') for i in range(4)]
        large = insert_failing(conn, "k-large", f'{{"blob": "{os.urandom(3000).hex()}"}}')
        large_key = insert_failing(conn, "k-large-headers", '{"small": true}',
                                   f'{{"blob": "{os.urandom(1250).hex()}"}}')
        small.append(insert_failing(conn, "k4", '{"small": 4}'))
        conn.commit()
    wait_for(lambda: dead_lettered(db_url, [*small, large]), 60, "every record the topic can take dead-lettered")
    with TopicReader(kafka_broker.bootstrap, dlq) as reader:
        records = reader.read_until(lambda msgs: {*small, large} <= set(event_ids(msgs)), 30)
    assert sorted(event_ids(records)) == sorted([*small, large]), "exactly one record each; none for the key"
    state = rows(db_url, [*small, large, large_key])
    for record in records:
        headers = dict(record.headers())
        event_id = int(headers["kaireon-dlq-event-id"])
        if event_id == large:
            assert record.value() is None and headers["kaireon-dlq-truncated"] == b"true"
        else:
            assert record.value() == state[event_id]["payload"].encode() and "kaireon-dlq-truncated" not in headers
    refused = tier.wait_log(lambda e: e.get("event") == "dead letter failed" and e.get("eventId") == large_key, 30,
                            "the record too large even without its value logged")
    assert refused["errorId"] and "MSG_SIZE_TOO_LARGE" in refused["error"]
    assert state[large_key]["dead_lettered_at"] is None and state[large_key]["status"] == "failed"
    wait_for(lambda: metric_value(port, "kaireon_outbox_dead_letter_waiting") == 1, 30, "the gauge names it")
    assert metric_value(port, "kaireon_outbox_dead_lettered_total") == 6
    assert tier.stop() == 0
