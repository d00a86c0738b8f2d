"""A claimed row as a Kafka record: its headers, its key, and the checks that find a row which
cannot become one (PoisonRow: the row is rejected, not retried)."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import orjson

from kaireon_pub.worker.rows import Row

# Kafka's rule for topic names; librdkafka refuses others only after a metadata round trip, and
# then with an error (_UNKNOWN_TOPIC) that does not say the name is the problem.
LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")
LEGAL_TOPICS_KEPT = 10_000  # topic names already found legal, each checked once (forgotten beyond this)


class PoisonRow(Exception):
    """The row itself cannot become a Kafka record (its headers, its key, its payload)."""


def check_topic(topic: str, legal_topics: set[str]) -> None:
    """PoisonRow for a name Kafka refuses; a legal one is remembered in `legal_topics` (a handful
    per tier)."""
    if not LEGAL_TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise PoisonRow(f"TOPIC_EXCEPTION: {topic!r} is not a valid Kafka topic name "
                        "(1 to 249 of a-z A-Z 0-9 . _ -, not '.' or '..')")
    if len(legal_topics) >= LEGAL_TOPICS_KEPT:
        legal_topics.clear()
    legal_topics.add(topic)


# A run of digits that may be an integer beyond 64 bits: orjson 3.13 reads one as a float (earlier
# versions refused it), so such a text is read by json, which keeps it exact.
_LONG_NUMBER = re.compile(r"\d{19,}")
_LONG_NUMBER_BYTES = re.compile(rb"\d{19,}")


def _load_json(text: str | bytes) -> Any:
    long_number = _LONG_NUMBER_BYTES if isinstance(text, bytes) else _LONG_NUMBER
    if long_number.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # json's error names the problem the same way
    return json.loads(text)


def _json_text(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _is_json(value: bytes) -> bool:
    try:
        _load_json(value)
    except ValueError:  # orjson's and json's decode errors, and bytes that are not UTF-8
        return False
    return True


def _json_object(text: str, column: str) -> dict[str, Any]:
    """A header column's JSON object; PoisonRow when it is not valid JSON or not an object."""
    if text == "{}":
        return {}
    try:
        value = _load_json(text)
    except ValueError as exc:
        raise PoisonRow(f"{column} are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PoisonRow(f"{column} must be a JSON object, found a JSON {type(value).__name__}")
    return value


def _own_headers(row: Row) -> list[tuple[str, bytes]]:
    """The event's own headers: str values as UTF-8, bytes values exactly.

    A non-string JSON value (written by plain SQL, or before str-only headers were enforced) is
    sent as its compact JSON text. Raises PoisonRow when either header column is not a JSON object.
    """
    headers: list[tuple[str, bytes]] = []
    for name, value in _json_object(row.headers, "headers").items():
        headers.append((name, value.encode() if isinstance(value, str) else _json_text(value)))
    for name, value in _json_object(row.binary_headers, "binary_headers").items():
        try:
            headers.append((name, base64.b64decode(value, validate=True)))
        except (TypeError, ValueError):
            raise PoisonRow(f"binary header {name!r} is not base64 text") from None
    return headers


# A header-control entry of the row's headers, read here and never sent: `own-only` leaves out the
# tier's event-id, event-type and created-at, so the record carries the event's own headers only.
# The trigger of an attached Debezium outbox table writes it (kaireon_pub.ops.debezium), so that
# a consumer written for Debezium's router sees the headers it saw before.
HEADERS_CONTROL = "kaireon-headers"
OWN_HEADERS_ONLY = b"own-only"


def record_headers(row: Row, cloudevents_source: str | None = None) -> list[tuple[str, bytes]]:
    """The record's headers: event-id, event-type, created-at (unless the row's header-control
    entry says own-only), the CloudEvents attributes when `cloudevents_source` is given, then the
    event's own headers.

    CloudEvents binary content mode (the Kafka protocol binding): ce_specversion 1.0, ce_id (the
    event id), ce_source, ce_type (the event type, else the topic), ce_time (created-at) and, when
    the record has a value, content-type (application/json when the value is JSON, else
    application/octet-stream). An attribute the event carries itself as a header (any case) is
    left to it: that is how an application sets its content-type, say application/avro.
    """
    event_id = b"%d" % row.id
    created_at = row.created_iso.encode()
    if row.event_type:
        headers = [("event-id", event_id), ("event-type", row.event_type.encode()), ("created-at", created_at)]
    else:
        headers = [("event-id", event_id), ("created-at", created_at)]
    if cloudevents_source is None and row.headers == "{}" and row.binary_headers == "{}":
        return headers  # most events: no header of their own, nothing to parse
    own = _own_headers(row)
    if HEADERS_CONTROL in row.headers:  # a substring test first: most rows do not carry it
        control = [value for name, value in own if name == HEADERS_CONTROL]
        if control:
            own = [(name, value) for name, value in own if name != HEADERS_CONTROL]
            if control[-1] == OWN_HEADERS_ONLY:
                headers = []
    if cloudevents_source is not None:
        given = {name.lower() for name, _ in own}
        attributes = [
            ("ce_specversion", b"1.0"),
            ("ce_id", event_id),
            ("ce_source", cloudevents_source.encode()),
            ("ce_type", (row.event_type or row.topic).encode()),
            ("ce_time", created_at),
        ]
        if row.payload is not None:
            kind = "application/json" if _is_json(row.payload) else "application/octet-stream"
            attributes.append(("content-type", kind.encode()))
        headers += [(name, value) for name, value in attributes if name not in given]
    return headers + own


def record_key(row: Row) -> bytes | None:
    """The record's key: the exact bytes the application gave, or the key's UTF-8."""
    if row.key_bytes is not None:
        return bytes(row.key_bytes)
    return row.key.encode() if row.key is not None else None
