"""Whether a record read back from the broker is a row's event, as the tier produced it.

    compare(row, record, cloudevents_source=None) -> Finding | None

`row` is a `kaireon_pub.worker.rows.Row` as the claim reads it (audit.sql's `audit_row_columns`
select the same columns with the same expressions, so `row.payload` holds the exact value bytes
the tier produced: `payload_bytes`, else the jsonb's text in UTF-8; None for a tombstone).
`record` is a `kaireon_pub.audit.broker.StoredRecord`. `cloudevents_source` is the tier's
`OUTBOX_CLOUDEVENTS_SOURCE` when `OUTBOX_CLOUDEVENTS` is on, else None: it only matters for a row
whose headers say own-only (an attached Debezium table), see below.

The answer:
- None: the record is this event, its key and value byte-equal to what the tier produces for it.
- Finding(kind=NOT_THIS_EVENT): the record is another event (another event id), or, for a row
  whose record carries no event id, not the record the tier would make for it.
- Finding(kind=ALTERED, differs=("key",), ("value",) or ("key", "value")): this event, but its
  key and/or value are not the bytes the tier produced for the row.

The key and value are built by the tier's own functions (worker/kafka/records.py: `record_key`,
`record_headers`), never a copy of them. Headers other than the event's identity are not compared:
a replayed record carries a replay header of its own and is still the event.

An event's identity on the broker (`record_event_id`): the tier's `event-id` header (the row id),
else the CloudEvents `ce_id` header (the same id). A row whose header control says own-only (the
Debezium trigger's `kaireon-headers: own-only`) without CloudEvents gets neither: its record is
recognised by its full header list (`record_headers(row)`, less the `traceparent` and
`tracestate` a traced publish adds or replaces and the `kaireon-replay` of a replay), and the audit can check it at its
recorded position only (`has_event_id(row, source)` is False for it).

H5 (the continuous auditor) and the `locate` / `audit` commands use this module; it does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kaireon_pub.audit.broker import StoredRecord
from kaireon_pub.worker.kafka.records import PoisonRow, record_headers, record_key
from kaireon_pub.worker.rows import Row

NOT_THIS_EVENT = "not-this-event"
ALTERED = "altered"
_ID_HEADERS = ("event-id", "ce_id")
# Headers a publish may add or replace on the tier's record of an own-only row: a traced publish's
# context (worker/kafka/spans.py: a recorded event span replaces the row's traceparent and drops its
# tracestate) and a replay's header (ops/replay.py). Left out of both lists when they are compared.
_ADDED_ON_PUBLISH = frozenset({"traceparent", "tracestate", "kaireon-replay"})


@dataclass(frozen=True)
class Finding:
    """What is wrong with the record at a row's recorded position."""

    kind: str  # NOT_THIS_EVENT or ALTERED
    event_id: int  # the row's id
    topic: str
    partition: int
    offset: int
    differs: tuple[str, ...] = ()  # ALTERED: "key", "value" or both
    found_event_id: int | None = None  # NOT_THIS_EVENT: the record's own event id, if it has one

    def describe(self) -> str:
        where = f"{self.topic}[{self.partition}]@{self.offset}"
        if self.kind == ALTERED:
            verb = "differs" if len(self.differs) == 1 else "differ"
            return f"event {self.event_id} at {where}: {' and '.join(self.differs)} {verb}"
        other = f"event {self.found_event_id}" if self.found_event_id is not None else "a record without an event id"
        return f"event {self.event_id}: {where} holds {other}"


def record_event_id(record: StoredRecord) -> int | None:
    """The event id a record carries: the first `event-id` header (the tier's own comes first,
    before the event's own headers), else the first `ce_id`; None without either (or not a number)."""
    for wanted in _ID_HEADERS:
        for name, value in record.headers:
            if name == wanted:
                try:
                    return int(value) if value is not None else None
                except ValueError:
                    return None
    return None


def _expected_headers(row: Row, cloudevents_source: str | None) -> list[tuple[str, bytes]] | None:
    try:
        return record_headers(row, cloudevents_source)
    except PoisonRow:  # its header columns changed since it was published: judge it by its id
        return None


def _own_headers(headers: Iterable[tuple[str, bytes | None]]) -> tuple[tuple[str, bytes | None], ...]:
    """The headers the tier's record of an own-only row always carries as they are (_ADDED_ON_PUBLISH left out)."""
    return tuple((name, value) for name, value in headers if name not in _ADDED_ON_PUBLISH)


def has_event_id(row: Row, cloudevents_source: str | None = None) -> bool:
    """Whether the tier's record for this row carries its event id (event-id or ce_id)."""
    if "kaireon-headers" not in row.headers:  # the header control: most rows do not carry it
        return True
    expected = _expected_headers(row, cloudevents_source)
    return expected is None or any(name in _ID_HEADERS for name, _ in expected)


def compare(row: Row, record: StoredRecord, cloudevents_source: str | None = None) -> Finding | None:
    """None when `record` is `row`'s event with the key and value the tier produced; else what differs."""
    found = record_event_id(record)
    if found is not None:
        if found != row.id:
            return Finding(NOT_THIS_EVENT, row.id, record.topic, record.partition, record.offset, found_event_id=found)
    elif has_event_id(row, cloudevents_source):
        return Finding(NOT_THIS_EVENT, row.id, record.topic, record.partition, record.offset)
    else:
        expected = _expected_headers(row, cloudevents_source)
        if expected is None or _own_headers(expected) != _own_headers(record.headers):
            return Finding(NOT_THIS_EVENT, row.id, record.topic, record.partition, record.offset)
    differs = tuple(name for name, same in (("key", record.key == record_key(row)),
                                            ("value", record.value == row.payload)) if not same)
    if differs:
        return Finding(ALTERED, row.id, record.topic, record.partition, record.offset, differs=differs)
    return None
