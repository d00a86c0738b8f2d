"""`kaireon-pub locate EVENT_ID`: one event's row and, once published, the record where its mark
says it landed, read back from the broker and compared with the row's bytes (audit/compare.py).

Exit codes (README, "Command line"; `kaireon-pub locate --help`):
  0  found: the record at the recorded position is this event, key and value byte-equal
  1  the database or the broker failed (logged); 5 the schema is behind
  10 no such row (never written, or purged after its retention)
  11 not published yet (pending, processing, or failed: the row says which)
  12 published without a recorded position (before migration 0007, or a duplicate-sequence delivery)
  13 missing on the broker: the position is not stored, or holds another event
  14 differs: the record is this event, its key or value is not what the tier produced
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
import psycopg
from confluent_kafka import KafkaException

from kaireon_pub.audit.broker import RecordReader, StoredRecord
from kaireon_pub.audit.compare import ALTERED, compare, record_event_id
from kaireon_pub.audit.sql import AUDIT, ROW_COLUMNS, as_row
from kaireon_pub.db import migrate
from kaireon_pub.db.connect import connect
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.ops.migrate import report_not_ready
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings
from kaireon_pub.worker.rows import Row

log = logging.getLogger("kaireon_pub.ops.locate")

FOUND = 0
NO_SUCH_ROW = 10
NOT_PUBLISHED = 11
NO_POSITION = 12
MISSING = 13
DIFFERS = 14
RESULTS = {FOUND: "equal", NO_SUCH_ROW: "no such row", NOT_PUBLISHED: "not published",
           NO_POSITION: "no recorded position", MISSING: "missing on the broker", DIFFERS: "differs"}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def describe_row(row: Row, values: tuple[Any, ...]) -> dict[str, Any]:
    status, last_error, created, published, next_attempt, dead_lettered, partition, offset = values[ROW_COLUMNS:]
    return {"id": row.id, "status": status, "attempts": row.attempts, "lastError": last_error,
            "createdAt": _iso(created), "publishedAt": _iso(published), "nextAttemptAt": _iso(next_attempt),
            "deadLetteredAt": _iso(dead_lettered), "topic": row.topic, "key": row.key,
            "position": {"partition": partition, "offset": offset} if offset is not None else None}


def check_on_broker(reader: RecordReader, row: Row, partition: int, offset: int,
                    cloudevents_source: str | None) -> tuple[int, dict[str, Any]]:
    """(exit code, the broker's part of the document) for a row published at (partition, offset)."""
    partitions = reader.partitions(row.topic)
    if partitions is None or partition not in partitions:
        where = "topic" if partitions is None else "partition"
        return MISSING, {"result": RESULTS[MISSING], "reason": f"{where} not on the broker"}
    low, high = reader.watermarks(row.topic, partition)
    if not low <= offset < high:
        return MISSING, {"result": RESULTS[MISSING], "low": low, "high": high,
                         "reason": f"offset {offset} not stored (the partition holds [{low}, {high}))"}
    record = reader.read_at(row.topic, partition, offset)
    if record is None:
        return MISSING, {"result": RESULTS[MISSING], "reason": f"offset {offset} not stored"}
    found = _record_json(record)
    finding = compare(row, record, cloudevents_source)
    if finding is None:
        return FOUND, {"result": RESULTS[FOUND], "record": found}
    if finding.kind == ALTERED:
        return DIFFERS, {"result": RESULTS[DIFFERS], "differs": list(finding.differs), "record": found}
    other = f"event {finding.found_event_id}" if finding.found_event_id is not None else "a record without an event id"
    return MISSING, {"result": RESULTS[MISSING], "reason": f"offset {offset} holds {other}", "record": found}


def _record_json(record: StoredRecord) -> dict[str, Any]:
    return {"eventId": record_event_id(record), "keyBytes": len(record.key) if record.key is not None else None,
            "valueBytes": len(record.value) if record.value is not None else None,
            "headers": [name for name, _ in record.headers]}


def locate(conn: psycopg.Connection, reader_factory: Callable[[], RecordReader], event_id: int,
           cloudevents_source: str | None = None) -> tuple[int, dict[str, Any]]:
    """(exit code, document) for one event id."""
    values = conn.execute(AUDIT.locate_row, {"id": event_id}).fetchone()
    if values is None:
        return NO_SUCH_ROW, {"id": event_id, "result": RESULTS[NO_SUCH_ROW]}
    row = as_row(values)
    doc = describe_row(row, values)
    if doc["status"] != "published":
        return NOT_PUBLISHED, doc | {"result": RESULTS[NOT_PUBLISHED]}
    if doc["position"] is None:
        return NO_POSITION, doc | {"result": RESULTS[NO_POSITION]}
    with reader_factory() as reader:
        code, broker = check_on_broker(reader, row, doc["position"]["partition"], doc["position"]["offset"],
                                       cloudevents_source)
    return code, doc | {"result": broker.pop("result"), "broker": broker}


def render(doc: dict[str, Any]) -> str:
    if doc["result"] == RESULTS[NO_SUCH_ROW]:
        return f"event {doc['id']}: no such row (never written, or purged after its retention)"
    lines = [f"event {doc['id']}: {doc['status']} (attempts {doc['attempts']})",
             f"  topic {doc['topic']}  key {doc['key']!r}",
             f"  created {doc['createdAt']}  published {doc['publishedAt'] or '-'}"]
    if doc["lastError"]:
        lines.append(f"  last error: {doc['lastError']}")
    if doc["deadLetteredAt"]:
        lines.append(f"  dead-lettered {doc['deadLetteredAt']}")
    if doc["position"] is not None:
        lines.append(f"  landed {doc['topic']}[{doc['position']['partition']}]@{doc['position']['offset']}")
    broker = doc.get("broker", {})
    if doc["result"] == RESULTS[FOUND]:
        lines.append("  broker: equal: the record carries this event id, its key and value are byte-equal")
    elif doc["result"] == RESULTS[DIFFERS]:
        lines.append(f"  broker: differs: {' and '.join(broker['differs'])} not the bytes the tier produced")
    elif doc["result"] == RESULTS[MISSING]:
        lines.append(f"  broker: missing: {broker['reason']}")
    elif doc["result"] == RESULTS[NO_POSITION]:
        lines.append("  broker: not checked: no recorded position (published before migration 0007, "
                     "or a duplicate-sequence delivery)")
    else:
        lines.append("  broker: not checked: not published yet")
    return "\n".join(lines)


def run(settings: Settings, event_id: int, *, as_json: bool, echo: Callable[[str], None]) -> int:
    """The command: locate, print (text or JSON); exit code as the module docstring says."""
    source = settings.cloudevents_source if settings.cloudevents else None
    try:
        with connect(settings, "locate") as conn:
            migrate.require_current(conn)
            code, doc = locate(conn, lambda: RecordReader(settings.producer_config), event_id, source)
    except migrate.SchemaNotReady as exc:
        return report_not_ready(exc, "locate")
    except (psycopg.Error, KafkaException, TimeoutError) as exc:
        log.error("locate failed", extra={"event": "locate failed", "errorId": new_error_id(), "id": event_id,
                                          "errorType": type(exc).__name__, "error": redact(str(exc), settings)})
        return ExitCode.CRASH
    echo(orjson.dumps(doc).decode() if as_json else render(doc))
    return code
