"""A claimed row as a Kafka record (worker/kafka/records.py): headers, key, and the rows that
cannot become one (PoisonRow)."""

from __future__ import annotations

import pytest

from kaireon_pub.worker.kafka import records
from kaireon_pub.worker.kafka.records import PoisonRow, check_topic, record_headers, record_key
from kaireon_pub.worker.rows import Row

CREATED = "2026-12-02T00:00:00.000000Z"
SOURCE = "/orders"


def row(**fields) -> Row:
    base = Row(7, "orders", "k", b'{"a":1}', "{}", "order.created", 0, 0, 1000, 0.0, CREATED)
    return base._replace(**fields)


def names(headers: list[tuple[str, bytes]]) -> list[str]:
    return [name for name, _ in headers]


def test_the_tiers_headers_come_first_and_event_type_only_when_set():
    assert record_headers(row()) == \
        [("event-id", b"7"), ("event-type", b"order.created"), ("created-at", CREATED.encode())]
    assert record_headers(row(event_type=None)) == [("event-id", b"7"), ("created-at", CREATED.encode())]
    assert record_headers(row(event_type="")) == [("event-id", b"7"), ("created-at", CREATED.encode())]


def test_own_headers_follow_str_values_as_utf8_others_as_compact_json_then_binary_ones():
    headers = record_headers(row(headers='{"s": "\\u00e9", "n": 7, "o": {"a": [1, true]}, "nil": null}',
                                 binary_headers='{"sig": "AAH+/w=="}'))
    assert names(headers) == ["event-id", "event-type", "created-at", "s", "n", "o", "nil", "sig"]
    own = dict(headers)
    assert own["s"] == "\u00e9".encode() and own["n"] == b"7" and own["o"] == b'{"a":[1,true]}'
    assert own["nil"] == b"null" and own["sig"] == b"\x00\x01\xfe\xff"


def test_an_integer_beyond_64_bits_in_a_header_is_kept_exactly():
    # orjson 3.13 reads it as a float: the header went out as 1.2345678901234568e+29.
    headers = dict(record_headers(row(headers='{"big": 123456789012345678901234567890, "neg": -98765432109876543210}')))
    assert headers["big"] == b"123456789012345678901234567890"
    assert headers["neg"] == b"-98765432109876543210"


@pytest.mark.parametrize(("columns", "reason"), [
    ({"headers": "[1, 2]"}, "headers must be a JSON object, found a JSON list"),
    ({"headers": '"text"'}, "headers must be a JSON object, found a JSON str"),
    ({"headers": "{not json"}, "headers are not valid JSON"),
    ({"binary_headers": "7"}, "binary_headers must be a JSON object, found a JSON int"),
    ({"binary_headers": '{"sig": "not base64!"}'}, "binary header 'sig' is not base64 text"),
    ({"binary_headers": '{"sig": 7}'}, "binary header 'sig' is not base64 text"),
    ({"binary_headers": '{"sig": "AAE"}'}, "binary header 'sig' is not base64 text"),  # bad padding
])
def test_header_columns_that_cannot_become_headers_make_a_poison_row(columns, reason):
    with pytest.raises(PoisonRow, match=reason):
        record_headers(row(**columns))
    with pytest.raises(PoisonRow, match=reason):  # with CloudEvents on too
        record_headers(row(**columns), SOURCE)


def test_cloudevents_attributes_after_the_tiers_headers_and_before_the_events_own():
    headers = record_headers(row(headers='{"x": "1"}'), SOURCE)
    assert names(headers) == ["event-id", "event-type", "created-at", "ce_specversion", "ce_id", "ce_source",
                              "ce_type", "ce_time", "content-type", "x"]
    ce = dict(headers)
    assert (ce["ce_specversion"], ce["ce_id"], ce["ce_source"], ce["ce_type"], ce["ce_time"]) == \
        (b"1.0", b"7", SOURCE.encode(), b"order.created", CREATED.encode())
    assert ce["content-type"] == b"application/json"


def test_cloudevents_type_falls_back_to_the_topic_and_content_type_follows_the_value():
    ce = dict(record_headers(row(event_type=None, payload=b"\x00\xff"), SOURCE))
    assert ce["ce_type"] == b"orders" and ce["content-type"] == b"application/octet-stream"
    tombstone = dict(record_headers(row(payload=None), SOURCE))
    assert "content-type" not in tombstone  # no value, no content type


def test_an_attribute_the_event_carries_itself_is_left_to_it_in_any_case():
    headers = record_headers(row(headers='{"Content-Type": "application/avro", "CE_SOURCE": "/mine"}'), SOURCE)
    assert ("content-type", b"application/json") not in headers and ("ce_source", SOURCE.encode()) not in headers
    assert ("Content-Type", b"application/avro") in headers and ("CE_SOURCE", b"/mine") in headers


def test_the_key_is_the_exact_bytes_when_given_else_the_texts_utf8_else_none():
    assert record_key(row(key="k-\u00e9")) == "k-\u00e9".encode()
    assert record_key(row(key="\\x00ff", key_bytes=memoryview(b"\x00\xff"))) == b"\x00\xff"
    assert record_key(row(key=None)) is None


@pytest.mark.parametrize("topic", ["", ".", "..", "a b", "orders/v1", "caf\u00e9", "x" * 250])
def test_a_topic_name_kafka_refuses_is_a_poison_row_and_not_remembered(topic):
    legal: set[str] = set()
    with pytest.raises(PoisonRow, match="TOPIC_EXCEPTION: .* is not a valid Kafka topic name"):
        check_topic(topic, legal)
    assert legal == set()


def test_a_legal_topic_is_remembered_and_the_memory_is_bounded(monkeypatch):
    legal: set[str] = set()
    for topic in ("orders.v1", "a-b_c", "...", "x" * 249):
        check_topic(topic, legal)
    assert legal == {"orders.v1", "a-b_c", "...", "x" * 249}
    monkeypatch.setattr(records, "LEGAL_TOPICS_KEPT", 4)
    check_topic("fifth", legal)
    assert legal == {"fifth"}  # forgotten beyond the bound, then remembered afresh
