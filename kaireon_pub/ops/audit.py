"""`kaireon-pub audit`: the published rows of a window, checked against the records the broker holds
at the positions their marks recorded.

The rows come in one read-only REPEATABLE READ transaction (its counts and its rows agree), streamed
through a server-side cursor by (topic, partition, offset): never all in memory. For each partition,
the range [min, max] of the rows' recorded offsets is read back (RecordReader.read_range, clamped
to what the partition still stores; without --until, from min to the partition's end, so that the
copies of an event produced after the window's last recorded offset are counted) beside its rows,
and judged by audit/partition.py (missing, altered, duplicated, out of order within a key;
relocated, compacted and unverifiable are counted, not findings). Each topic's cleanup.policy is
read once (RecordReader.compacted): on a compacted topic, a gap whose key has a later record in
the range read is `compacted`, not missing. Exit 0 when clean, FINDINGS on any finding,
1 on a database or broker failure, 5 when the schema is behind.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from confluent_kafka import KafkaException

from kaireon_pub.audit.broker import RecordReader, StoredRecord
from kaireon_pub.audit.partition import KINDS, Tally, audit_partition
from kaireon_pub.audit.sql import AUDIT, ROW_COLUMNS, as_row
from kaireon_pub.db import migrate
from kaireon_pub.db.connect import connect
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.ops.migrate import report_not_ready
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.ops.audit")

FINDINGS = 10  # the exit code when the audit found anything (README, "Command line")
FETCH_ROWS = 2000  # rows per fetch of the server-side cursor
SHOW = 20  # events listed per kind in the text output (--json: audit/partition.py's SAMPLE)
# The audit's transaction waits on the broker between fetches: no statement or idle timeout of the
# tier's (OUTBOX_STATEMENT_TIMEOUT_MS) may end it; a dead client's session still ends with its socket.
IDLE_TIMEOUT_MS = 600_000

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when it names no zone), or a duration ago: 90s, 30m, 6h, 7d."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        ago = timedelta(**{_UNITS[relative[2]]: float(relative[1])})
        return (now or datetime.now(UTC)) - ago
    when = datetime.fromisoformat(text.strip())
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Window:
    since: datetime | None = None
    until: datetime | None = None
    topic: str | None = None

    def params(self) -> dict[str, object]:
        return {"since": self.since, "until": self.until, "topic": self.topic}

    def as_json(self) -> dict[str, object]:
        return {"since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None, "topic": self.topic}


def audit(conn: psycopg.Connection, reader: RecordReader, window: Window, *, cloudevents_source: str | None = None,
          on_total: Callable[[int], None] | None = None, on_row: Callable[[], None] | None = None) -> Tally:
    """The audit of `window` (conn: autocommit, idle; its transaction is opened and closed here)."""
    tally = Tally()
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    with conn.transaction():
        conn.execute("SELECT set_config('statement_timeout', '0', true), "
                     "set_config('idle_in_transaction_session_timeout', %s, true)", (str(IDLE_TIMEOUT_MS),))
        params = window.params()
        ranges = {(topic, partition): (low, high, count)
                  for topic, partition, low, high, count in conn.execute(AUDIT.audit_partitions, params)}
        tally.unverifiable = conn.execute(AUDIT.audit_unverifiable, params).fetchone()[0]
        if on_total is not None:
            on_total(sum(count for _, _, count in ranges.values()))
        with conn.cursor(name="kaireon_pub_audit") as cursor:
            cursor.itersize = FETCH_ROWS
            cursor.execute(AUDIT.audit_rows, params)
            known: dict[str, list[int] | None] = {}
            compacted: dict[str, bool] = {}  # the topic's cleanup.policy includes compact: read once
            for (topic, partition), group in itertools.groupby(cursor, key=lambda t: (t[1], t[ROW_COLUMNS])):
                low, high, _ = ranges[(topic, partition)]
                if topic not in known:
                    known[topic] = reader.partitions(topic)
                    compacted[topic] = known[topic] is not None and reader.compacted(topic)
                records, stored = _records(reader, topic, partition, low, high, known[topic],
                                           to_end=window.until is None)
                audit_partition(topic, partition, ((as_row(t), t[ROW_COLUMNS + 1]) for t in group), records, tally,
                                cloudevents_source=cloudevents_source, stored=stored,
                                compacted=compacted[topic], on_row=on_row)
    return tally


def _records(reader: RecordReader, topic: str, partition: int, low: int, high: int,
             partitions: list[int] | None, *, to_end: bool) -> tuple[Iterator[StoredRecord], str]:
    """The records of [low, high] the partition still stores (`to_end`: of [low, its end]), or none and why."""
    if partitions is None:
        return iter(()), "topic not on the broker"
    if partition not in partitions:
        return iter(()), "partition not on the broker"
    first, end = reader.watermarks(topic, partition)
    start, stop = max(low, first), end if to_end else min(high + 1, end)
    if stop <= start:
        return iter(()), ""
    return reader.read_range(topic, partition, start, stop), ""


def render(tally: Tally) -> str:
    lines = []
    for kind, label in zip(KINDS, ("missing", "altered", "duplicated", "out of order"), strict=True):
        events = tally.events[kind]
        for event in events[:SHOW]:
            lines.append(f"{label}: {_describe(kind, event)}")
        if tally.counts[kind] > SHOW:
            lines.append(f"{label}: ... {tally.counts[kind] - SHOW} more (--json lists up to {len(events)})")
    lines.append(tally.summary())
    return "\n".join(lines)


def _describe(kind: str, event: dict[str, Any]) -> str:
    where = f"event {event['id']} {event['topic']}[{event['partition']}]"
    if kind == "missing":
        return f"{where}@{event['offset']}: {event['reason']}"
    if kind == "altered":
        stored = f" (stored at {event['storedAt']})" if "storedAt" in event else ""
        return f"{where}@{event['offset']}{stored}: {' and '.join(event['differs'])} differs"
    if kind == "duplicated":
        return f"{where}: {event['copies']} copies, the first at {event['firstOffset']}"
    return f"{where}@{event['offset']}: key {event['key']!r} after event {event['after']} at {event['afterOffset']}"


def run(settings: Settings, window: Window, *, as_json: bool, echo: Callable[[str], None],
        progress: bool = False) -> int:
    """The command: audit, print (text or JSON); exit code as the module docstring says."""
    source = settings.cloudevents_source if settings.cloudevents else None
    try:
        with connect(settings, "audit") as conn, RecordReader(settings.producer_config) as reader, \
                contextlib.ExitStack() as stack:
            migrate.require_current(conn)
            bar: list[Any] = []

            def on_total(total: int) -> None:
                if progress:
                    import click

                    bar.append(stack.enter_context(click.progressbar(
                        length=total, label="audit", file=sys.stderr, update_min_steps=max(1, total // 200))))

            tally = audit(conn, reader, window, cloudevents_source=source, on_total=on_total,
                          on_row=(lambda: bar[0].update(1)) if progress else None)
    except migrate.SchemaNotReady as exc:
        return report_not_ready(exc, "audit")
    except (psycopg.Error, KafkaException, TimeoutError) as exc:
        log.error("audit failed", extra={"event": "audit failed", "errorId": new_error_id(),
                                         "errorType": type(exc).__name__, "error": redact(str(exc), settings)})
        return ExitCode.CRASH
    echo(orjson.dumps({"window": window.as_json()} | tally.as_json()).decode() if as_json else render(tally))
    return FINDINGS if tally.findings else ExitCode.OK
