"""Payloads as the application wrote them (issue 15), end to end: real PostgreSQL, real broker,
`kaireon-pub run` as a process, the records read back from the topic."""

from __future__ import annotations

import io
import struct
import uuid

import fastavro
import orjson
import psycopg
import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat

from kaireon_pub import Event, enqueue, enqueue_many
from kaireon_pub.db.migrate import available, migrate
from tests.helpers import TopicReader, status_counts, wait_for


def read_by_id(reader: TopicReader, ids: list[int], timeout: float = 60) -> dict[int, object]:
    messages = reader.read_count(len(ids), timeout=timeout)
    by_id = {int(dict(m.headers())["event-id"]): m for m in messages}
    assert set(by_id) == set(ids)
    return by_id


def test_values_keys_and_headers_arrive_byte_for_byte(db_url, topic, start_tier, topic_reader):
    out_of_order = {"zeta": 1, "alpha": {"b": 2, "a": 1}, "n": 1.5}
    whitespace = '{\n\t"total" :  10 ,\r\n "items":[ ]}  \n'
    arbitrary = bytes(range(256))
    with psycopg.connect(db_url) as conn:
        as_dict = enqueue(conn, topic=topic, key="order-1", payload=out_of_order)
        as_str = enqueue(conn, topic=topic, key=42, payload=whitespace)
        as_bytes, with_binary_key, tombstone = enqueue_many(conn, [
            Event(topic, b"order-2", arbitrary, headers={"sig": b"\x00\x9f\xff\x10", "traceparent": "00-ab-cd-01"}),
            Event(topic, b"\x00\xffkey", b"v"),
            Event(topic, "order-1", None, event_type="order.deleted"),
        ])
        conn.commit()
    tier = start_tier()
    by_id = read_by_id(topic_reader(topic), [as_dict, as_str, as_bytes, with_binary_key, tombstone])

    assert by_id[as_dict].value() == orjson.dumps(out_of_order) == b'{"zeta":1,"alpha":{"b":2,"a":1},"n":1.5}'
    assert by_id[as_dict].key() == b"order-1"
    assert by_id[as_str].value() == whitespace.encode()
    assert by_id[as_str].key() == b"42"  # an int key: its decimal text
    assert by_id[as_bytes].value() == arbitrary and len(by_id[as_bytes].value()) == 256
    assert by_id[as_bytes].key() == b"order-2"
    headers = by_id[as_bytes].headers()
    assert ("sig", b"\x00\x9f\xff\x10") in headers and ("traceparent", b"00-ab-cd-01") in headers
    assert [name for name, _ in headers][:2] == ["event-id", "created-at"]
    assert by_id[with_binary_key].key() == b"\x00\xffkey"
    assert by_id[tombstone].value() is None  # a tombstone, not the four bytes "null"
    assert by_id[tombstone].key() == b"order-1"
    assert dict(by_id[tombstone].headers())["event-type"] == b"order.deleted"
    wait_for(lambda: status_counts(db_url) == {"published": 5}, 30, "all five published")
    assert tier.stop() == 0


def test_an_avro_value_with_the_schema_registry_framing_arrives_as_encoded(db_url, topic, start_tier, topic_reader):
    # What confluent-kafka's AvroSerializer writes: magic byte 0, the schema id (big-endian int32),
    # then the Avro binary encoding. The registry only supplies the id; none is needed here.
    schema = fastavro.parse_schema({"type": "record", "name": "OrderPlaced", "fields": [
        {"name": "id", "type": "string"}, {"name": "total_cents", "type": "long"}]})
    body = io.BytesIO()
    fastavro.schemaless_writer(body, schema, {"id": "o-7", "total_cents": 1999})
    framed = b"\x00" + struct.pack(">I", 17) + body.getvalue()
    with psycopg.connect(db_url) as conn:
        event_id = enqueue(conn, topic=topic, key="o-7", payload=framed,
                           headers={"content-type": "application/avro"}, event_type="order.placed")
        conn.commit()
    tier = start_tier()
    message = read_by_id(topic_reader(topic), [event_id])[event_id]
    value = message.value()
    assert value == framed
    assert value[0] == 0 and struct.unpack(">I", value[1:5]) == (17,)
    assert fastavro.schemaless_reader(io.BytesIO(value[5:]), schema) == {"id": "o-7", "total_cents": 1999}
    assert tier.stop() == 0


def test_with_cloudevents_on_the_sdk_reads_the_record_as_an_event(db_url, topic, start_tier, topic_reader):
    with psycopg.connect(db_url) as conn:
        json_id = enqueue(conn, topic=topic, key="o-1", payload={"total": 10}, event_type="order.created")
        avro_id = enqueue(conn, topic=topic, key="o-1", payload=b"\x00\x00\x00\x00\x11\x0eo-7\x9e\x1f",
                          headers={"content-type": "application/avro", "ce_subject": "o-1"})
        created = dict(conn.execute("SELECT id, created_at FROM outbox_events").fetchall())
        conn.commit()
    tier = start_tier(OUTBOX_CLOUDEVENTS="true", OUTBOX_CLOUDEVENTS_SOURCE="/kaireon/orders-service")
    by_id = read_by_id(topic_reader(topic), [json_id, avro_id])

    def event(message):
        return from_binary(KafkaMessage(headers=dict(message.headers()), key=message.key(), value=message.value()),
                           JSONFormat())

    created_event = event(by_id[json_id])
    assert created_event.get_id() == str(json_id)
    assert created_event.get_type() == "order.created"
    assert created_event.get_source() == "/kaireon/orders-service"
    assert created_event.get_specversion() == "1.0"
    assert created_event.get_time() == created[json_id]  # created-at, to the microsecond
    assert created_event.get_datacontenttype() == "application/json"
    assert created_event.get_data() == {"total": 10}
    assert created_event.get_extension("partitionkey") == "o-1"
    avro_event = event(by_id[avro_id])
    assert avro_event.get_type() == topic  # no event type: the topic
    assert avro_event.get_datacontenttype() == "application/avro"  # the event's own header
    assert avro_event.get_subject() == "o-1"
    assert avro_event.get_time() == created[avro_id]
    assert by_id[avro_id].value() == b"\x00\x00\x00\x00\x11\x0eo-7\x9e\x1f"
    # The tier's own headers are still there.
    assert dict(by_id[json_id].headers())["event-id"] == str(json_id).encode()
    assert tier.stop() == 0


@pytest.fixture
def db_before_0003(pg):
    """A database migrated only up to 0002 (the release before payload bytes)."""
    name = f"kaireon_pre3_{uuid.uuid4().hex[:8]}"
    url = pg.create_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, migrations=[m for m in available() if m.version < 3])
    yield url
    pg.drop_database(name)


def test_rows_written_before_the_migration_reach_the_topic_unchanged(db_before_0003, topic, start_tier, topic_reader):
    # Rows as the older enqueue and plain SQL wrote them: jsonb payloads (jsonb renders them in its
    # own way: that text is what the older tier published), str and non-str header values.
    with psycopg.connect(db_before_0003) as conn:
        conn.execute(
            """INSERT INTO outbox_events (topic, partition_key, payload, headers, event_type)
               SELECT %s, 'k' || (g %% 3),
                      jsonb_build_object('zeta', g, 'alpha', 'x' || g, 'nested', '{"b": 1, "a": [1, 2.50]}'::jsonb),
                      '{"traceparent": "00-ab", "meta": {"n": 1}, "n": 7}', 'legacy.event'
               FROM generate_series(1, 20) g""", (topic,))
        conn.execute("INSERT INTO outbox_events (topic, partition_key, payload) VALUES (%s, 'k-null', 'null')",
                     (topic,))
        before = dict(conn.execute("SELECT id, convert_to(payload::text, 'UTF8') FROM outbox_events").fetchall())
        conn.commit()
    with psycopg.connect(db_before_0003, autocommit=True) as conn:
        migrate(conn)
    tier = start_tier(db_url=db_before_0003)
    by_id = read_by_id(topic_reader(topic), list(before))
    for event_id, expected in before.items():
        assert by_id[event_id].value() == expected, event_id
    sample = by_id[min(before)]
    assert sample.value() == b'{"zeta": 1, "alpha": "x1", "nested": {"a": [1, 2.50], "b": 1}}'  # jsonb's rendering
    headers = dict(sample.headers())
    assert headers["traceparent"] == b"00-ab" and headers["meta"] == b'{"n":1}' and headers["n"] == b"7"
    assert headers["event-type"] == b"legacy.event" and sample.key() == b"k1"
    assert by_id[max(before)].value() == b"null"  # JSON null written before: still the four bytes
    wait_for(lambda: status_counts(db_before_0003) == {"published": 21}, 30, "all published")
    assert tier.stop() == 0
