"""Publisher.publish against the real broker: what each event's fate is, and when publish returns."""

import asyncio
import time

import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat

from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka.publisher import Publisher
from kaireon_pub.worker.kafka.records import PoisonRow, record_headers, record_key
from kaireon_pub.worker.rows import Row


def rows_for(topic: str, keys: list[str], headers: dict[int, str] | None = None,
             binary_headers: dict[int, str] | None = None) -> list[Row]:
    """Rows shaped as the claim returns them, ids 1..n in order."""
    now = time.time()
    return [Row(i, topic, key, f'{{"i": {i}}}'.encode(), (headers or {}).get(i, "{}"), "test.event", 0, 0, 1000 + i,
                now, "2026-11-28T00:00:00.000000Z", (binary_headers or {}).get(i, "{}"))
            for i, key in enumerate(keys, start=1)]


def publish(broker, rows):
    settings = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap})
    publisher = Publisher(settings, client_id="test-publisher")
    # A deadline far beyond the test's timeout: publish must return on the last report, not on it.
    deadline = time.monotonic() + 600
    return asyncio.run(publisher.publish(rows, True, deadline, lambda: float("inf")))


@pytest.mark.timeout(60)
def test_publish_returns_once_every_report_is_in(broker, topic):
    rows = rows_for(topic, [f"k{i % 3}" for i in range(30)])
    outcome = publish(broker, rows)
    assert sorted(outcome.delivered) == list(range(1, 31))
    assert len(outcome.ages) == 30
    assert not (outcome.released or outcome.rejected or outcome.retry or outcome.transient_error)


@pytest.mark.timeout(60)
def test_a_row_whose_headers_are_not_an_object_fails_alone(broker, topic):
    # Row 3's headers are a JSON array (plain SQL or a restore can write that); row 5 shares its
    # key and must wait (strict order), every other row is delivered in the same batch.
    rows = rows_for(topic, ["a", "b", "poison", "c", "poison", "d"], headers={3: "[1, 2]"})
    outcome = publish(broker, rows)
    assert sorted(outcome.delivered) == [1, 2, 4, 6]
    assert list(outcome.rejected) == [3] and "JSON object" in outcome.rejected[3]
    assert outcome.released == [5]
    assert not (outcome.retry or outcome.transient_error or outcome.producer_error)


def test_header_values_that_are_not_strings_are_sent_as_json():
    row = rows_for("t", ["k"], headers={1: '{"s": "x", "meta": {"n": 1}, "n": 7, "ok": true, "nil": null}'})[0]
    headers = dict(record_headers(row))
    assert headers["s"] == b"x"
    assert headers["meta"] == b'{"n":1}'
    assert headers["n"] == b"7" and headers["ok"] == b"true" and headers["nil"] == b"null"
    assert headers["event-id"] == b"1" and headers["event-type"] == b"test.event"


# ---- the record: value, key, headers -----------------------------------------------------------

def test_bytes_header_values_are_sent_exactly_after_the_str_ones():
    row = rows_for("t", ["k"], headers={1: '{"traceparent": "00-ab"}'},
                   binary_headers={1: '{"sig": "AAH+/w==", "empty": ""}'})[0]
    headers = record_headers(row)
    assert [name for name, _ in headers] == ["event-id", "event-type", "created-at", "traceparent", "sig", "empty"]
    assert dict(headers)["sig"] == b"\x00\x01\xfe\xff" and dict(headers)["empty"] == b""


@pytest.mark.parametrize(("binary_headers", "reason"), [
    ("[1]", "binary_headers must be a JSON object"),
    ('{"sig": "not base64!"}', "binary header 'sig' is not base64"),
    ('{"sig": 7}', "binary header 'sig' is not base64"),
])
def test_binary_headers_that_cannot_be_decoded_make_a_poison_row(binary_headers, reason):
    row = rows_for("t", ["k"], binary_headers={1: binary_headers})[0]
    with pytest.raises(PoisonRow, match=reason):
        record_headers(row)


def test_the_key_is_the_exact_bytes_when_there_are_some_else_the_text():
    text, binary, none = rows_for("t", ["k-\u00e9", "\\x00ff", None])
    assert record_key(text) == "k-\u00e9".encode()
    assert record_key(binary._replace(key_bytes=b"\x00\xff")) == b"\x00\xff"
    assert record_key(none) is None


CE_SOURCE = "/orders-service"


def parsed(row: Row):
    """The record as the cloudevents SDK's Kafka binding reads it."""
    message = KafkaMessage(headers=dict(record_headers(row, CE_SOURCE)), key=record_key(row), value=row.payload)
    return from_binary(message, JSONFormat())


def test_cloudevents_attributes_in_binary_content_mode():
    row = rows_for("orders.v1", ["o-1"])[0]._replace(id=4711, event_type="order.created", payload=b'{"total": 10}')
    event = parsed(row)
    assert (event.get_id(), event.get_source(), event.get_type(), event.get_specversion()) == \
        ("4711", CE_SOURCE, "order.created", "1.0")
    assert event.get_time().isoformat() == "2026-11-28T00:00:00+00:00"
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data() == {"total": 10}
    # The tier's own headers stay.
    assert dict(record_headers(row, CE_SOURCE))["event-id"] == b"4711"
    # Off: none of them.
    assert not [n for n, _ in record_headers(row) if n.startswith("ce_") or n == "content-type"]


def test_cloudevents_content_type_is_the_events_own_else_json_or_octet_stream():
    avro = rows_for("t", ["k"], headers={1: '{"Content-Type": "application/avro"}'})[0]
    avro = avro._replace(payload=b"\x00\xff\x0e")
    names = [name.lower() for name, _ in record_headers(avro, CE_SOURCE)]
    assert names.count("content-type") == 1
    assert dict(record_headers(avro, CE_SOURCE))["Content-Type"] == b"application/avro"
    binary = avro._replace(headers="{}")
    assert dict(record_headers(binary, CE_SOURCE))["content-type"] == b"application/octet-stream"
    assert parsed(binary).get_data() == b"\x00\xff\x0e"
    tombstone = binary._replace(payload=None)
    assert "content-type" not in dict(record_headers(tombstone, CE_SOURCE))


def test_cloudevents_type_is_the_topic_without_an_event_type_and_the_events_own_attributes_win():
    row = rows_for("orders.v1", ["k"], headers={1: '{"ce_subject": "o-1", "ce_source": "/elsewhere"}'})[0]
    event = parsed(row._replace(event_type=None))
    assert event.get_type() == "orders.v1"
    assert event.get_subject() == "o-1" and event.get_source() == "/elsewhere"
    assert [n for n, _ in record_headers(row, CE_SOURCE)].count("ce_source") == 1


@pytest.mark.timeout(60)
def test_a_row_whose_binary_headers_are_broken_fails_alone(broker, topic):
    rows = rows_for(topic, ["a", "poison", "b"], binary_headers={2: '{"sig": "%%%"}'})
    outcome = publish(broker, rows)
    assert sorted(outcome.delivered) == [1, 3]
    assert list(outcome.rejected) == [2] and "base64" in outcome.rejected[2]


@pytest.mark.timeout(60)
def test_an_invalid_topic_name_is_the_events_fault_every_time(broker, topic):
    # librdkafka reports such a topic as _UNKNOWN_TOPIC once it has looked it up: the same row in
    # a second batch must still fail alone, not stop the batch (a poison event, not a broker fault).
    for _ in range(2):
        rows = rows_for(topic, ["a", "b"])
        rows[0] = rows[0]._replace(topic="not a valid topic!")
        outcome = publish(broker, rows)
        assert list(outcome.rejected) == [1] and "not a valid Kafka topic name" in outcome.rejected[1]
        assert outcome.delivered == [2]
        assert not (outcome.systemic_error or outcome.transient_error or outcome.producer_error)
