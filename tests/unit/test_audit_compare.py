"""Whether a record read back is a row's event as the tier produced it (kaireon_pub/audit/compare.py)."""

from __future__ import annotations

import json

from kaireon_pub.audit.broker import StoredRecord
from kaireon_pub.audit.compare import ALTERED, NOT_THIS_EVENT, compare, has_event_id, record_event_id
from kaireon_pub.worker.kafka.records import HEADERS_CONTROL, record_headers, record_key
from kaireon_pub.worker.rows import Row

CREATED = "2026-12-02T00:00:00.000000Z"


def row(**fields) -> Row:
    base = Row(7, "orders", "k", b'{"a":1}', "{}", "order.created", 0, 0, 1000, 0.0, CREATED)
    return base._replace(**fields)


def as_produced(r: Row, source: str | None = None, **changes) -> StoredRecord:
    """The record the tier produces for `r` (its own functions), with `changes` applied."""
    fields = {"topic": r.topic, "partition": 0, "offset": 42, "key": record_key(r), "value": r.payload,
              "headers": tuple(record_headers(r, source))}
    fields.update(changes)
    return StoredRecord(**fields)


def test_the_record_the_tier_produced_is_equal():
    assert compare(row(), as_produced(row())) is None


def test_a_tombstone_and_binary_key_and_payload_are_compared_byte_for_byte():
    r = row(payload=None, key="\\x00ff", key_bytes=b"\x00\xff")
    assert compare(r, as_produced(r)) is None
    binary = row(payload=b"\x00\x01\xfe")
    assert compare(binary, as_produced(binary)) is None
    empty = as_produced(r, value=b"")  # an empty value is not a tombstone
    assert compare(r, empty).differs == ("value",)


def test_a_different_value_or_key_is_altered():
    finding = compare(row(), as_produced(row(), value=b'{"a":2}'))
    assert finding.kind == ALTERED and finding.differs == ("value",) and finding.event_id == 7
    assert finding.offset == 42 and "value differs" in finding.describe()
    assert compare(row(), as_produced(row(), key=b"other")).differs == ("key",)
    both = compare(row(), as_produced(row(), key=None, value=None))
    assert both.differs == ("key", "value") and "key and value differ" in both.describe()


def test_another_events_record_is_not_this_event():
    other = as_produced(row(id=8))
    finding = compare(row(), other)
    assert finding.kind == NOT_THIS_EVENT and finding.found_event_id == 8
    assert "holds event 8" in finding.describe()
    nameless = as_produced(row(), headers=())
    assert compare(row(), nameless).kind == NOT_THIS_EVENT


def test_headers_besides_the_identity_are_not_compared():
    replayed = as_produced(row(), headers=tuple(record_headers(row())) + (("kaireon-replay", b"run-1"),))
    assert compare(row(), replayed) is None


def test_the_event_id_is_the_tiers_first_header_not_an_own_header_of_the_same_name():
    r = row(headers=json.dumps({"event-id": "999"}))
    record = as_produced(r)
    assert record_event_id(record) == 7
    assert compare(r, record) is None


def test_cloudevents_records_are_equal_and_an_own_only_row_is_known_by_ce_id():
    own_only = row(headers=json.dumps({"id": "x", HEADERS_CONTROL: "own-only"}))
    record = as_produced(own_only, "/orders")
    assert record.header("event-id") is None and record_event_id(record) == 7
    assert has_event_id(own_only, "/orders")
    assert compare(own_only, record, "/orders") is None
    assert compare(row(), as_produced(row(), "/orders"), "/orders") is None


def test_an_own_only_row_without_cloudevents_is_known_by_its_header_list():
    own_only = row(headers=json.dumps({"id": "uuid-1", HEADERS_CONTROL: "own-only"}))
    assert not has_event_id(own_only)
    record = as_produced(own_only)
    assert record.headers == (("id", b"uuid-1"),)
    assert compare(own_only, record) is None
    assert compare(own_only, as_produced(own_only, headers=(("id", b"uuid-2"),))).kind == NOT_THIS_EVENT
    assert compare(own_only, as_produced(own_only, value=b"x")).kind == ALTERED


def test_an_own_only_rows_record_is_still_its_event_when_traced_or_replayed():
    """A traced publish adds the event span's traceparent (or replaces the row's, dropping its
    tracestate: worker/kafka/spans.py); a replay adds kaireon-replay: neither makes it another event."""
    own_only = row(headers=json.dumps({"id": "uuid-1", HEADERS_CONTROL: "own-only"}))
    traced = as_produced(own_only, headers=(("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
                                            ("id", b"uuid-1")))
    assert compare(own_only, traced) is None
    replayed = as_produced(own_only, headers=(("id", b"uuid-1"), ("kaireon-replay", b"run-7")))
    assert compare(own_only, replayed) is None
    written_in = row(headers=json.dumps({"id": "uuid-1", "traceparent": "00-" + "c" * 32 + "-" + "d" * 16 + "-01",
                                         "tracestate": "v=1", HEADERS_CONTROL: "own-only"}))
    replaced = as_produced(written_in, headers=(("id", b"uuid-1"),
                                                ("traceparent", b"00-" + b"e" * 32 + b"-" + b"f" * 16 + b"-01")))
    assert compare(written_in, replaced) is None
    # The other headers still tell the event: another id is another event, a header lost too.
    assert compare(own_only, as_produced(own_only, headers=(("traceparent", b"00-x"), ("id", b"uuid-2")))).kind \
        == NOT_THIS_EVENT
    assert compare(written_in, as_produced(written_in, headers=(("traceparent", b"00-x"),))).kind == NOT_THIS_EVENT


def test_the_stored_records_event_id_is_the_tiers_first_header_too():
    r = row(headers=json.dumps({"event-id": "999"}))
    record = as_produced(r)
    assert record.event_id == 7 and record.header("event-id") == b"999"  # header(): the last, as before
