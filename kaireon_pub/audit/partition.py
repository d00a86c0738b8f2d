"""The audit's judgement of one partition: its rows (with their recorded offsets) beside the records
read back from the range of those offsets. No I/O: rows and records are given as iterables, each
in offset order, and walked side by side once (ops/audit.py streams both).

Findings, per row of the window (`Tally`):
- missing: the recorded offset is not stored (below the log start, past its end, a gap) or holds
  another event, and the event is nowhere in the range read;
- altered: the record of this event (at its recorded offset, else the first copy found in the
  range) has another key or value than the tier produced for the row (compare.py);
- duplicated: the event's id at more than one offset of the range read (`extra` counts the copies
  beyond the first);
- out of order: among the rows of one key whose record sits at its recorded offset, one whose
  table order (xid, id) is before that of a row of the key at a lower offset.
Not findings: `relocated` (the recorded offset holds something else, the event is stored at another
offset of the range: a replay that kept the first positions, a position recorded wrong),
`compacted` (on a topic whose cleanup.policy includes compact, `compacted=True`: the recorded
offset is not stored, the event is nowhere in the range, and a record of its key sits at a higher
offset of the range: the broker removed it as superseded, a compacted topic's normal state) and
`unverifiable` (rows without a recorded position, counted by the caller). On a compacted topic a
gap with no later record of its key in the range is still `missing`: that includes a key whose
last record was a tombstone the broker has since removed (delete.retention.ms, 24 h by default),
so audit a compacted topic's window within that time, or read its `missing` with this in mind.

A row whose record carries no event id (an own-only Debezium row without CloudEvents: compare.py)
is judged at its recorded offset only. Memory: one small entry per event id met in the range read,
one per key of the partition, and the rows found out of place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kaireon_pub.audit.broker import StoredRecord
from kaireon_pub.audit.compare import ALTERED, compare, has_event_id, record_event_id
from kaireon_pub.worker.kafka.records import record_key
from kaireon_pub.worker.rows import Row

KINDS = ("missing", "altered", "duplicated", "outOfOrder")
SAMPLE = 1000  # the events listed per kind (the counts are exact)


@dataclass
class Tally:
    """The audit's counts and, per kind of finding, the first SAMPLE events."""

    rows: int = 0  # rows with a recorded position, judged
    equal: int = 0  # at their recorded offset, byte-equal
    relocated: int = 0
    compacted: int = 0  # gaps of a compacted topic whose key has a later record: superseded, not lost
    unverifiable: int = 0
    extra_copies: int = 0  # duplicated: the copies beyond the first, over all duplicated events
    partitions: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    events: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {kind: [] for kind in KINDS})

    def add(self, kind: str, event: dict[str, Any]) -> None:
        self.counts[kind] += 1
        if len(self.events[kind]) < SAMPLE:
            self.events[kind].append(event)

    @property
    def findings(self) -> int:
        return sum(self.counts.values())

    def as_json(self) -> dict[str, Any]:
        findings: dict[str, Any] = {kind: {"count": self.counts[kind], "events": self.events[kind],
                                           "truncated": self.counts[kind] > len(self.events[kind])} for kind in KINDS}
        findings["duplicated"]["extraCopies"] = self.extra_copies
        return {"clean": self.findings == 0, "rows": self.rows, "equal": self.equal, "relocated": self.relocated,
                "compacted": self.compacted, "unverifiable": self.unverifiable, "partitions": self.partitions,
                "findings": findings}

    def summary(self) -> str:
        found = ", ".join(f"{self.counts[kind]} {label}" for kind, label in (
            ("missing", "missing"), ("altered", "altered"), ("duplicated", "duplicated"),
            ("outOfOrder", "out of order")))
        extra = f" ({self.extra_copies} extra copies)" if self.extra_copies else ""
        verdict = "clean" if self.findings == 0 else f"{self.findings} finding{'s' * (self.findings != 1)}"
        partitions = f"{self.partitions} partition{'s' * (self.partitions != 1)}"
        compacted = (f"{self.compacted} compacted (superseded by a later record of their key), "
                     if self.compacted else "")
        return (f"audit: {verdict}: {self.rows} events checked in {partitions}, {found}{extra}; "
                f"{self.relocated} relocated, {compacted}{self.unverifiable} unverifiable (no recorded position)")


class _Seen:
    """What the range read holds of one event id."""

    __slots__ = ("copies", "first_offset", "content", "audited")

    def __init__(self) -> None:
        self.copies = 0
        self.first_offset = -1
        self.content = 0  # hash((key, value)) of the first copy
        self.audited = False  # a row of the window has this id


def audit_partition(topic: str, partition: int, rows: Iterable[tuple[Row, int]], records: Iterable[StoredRecord],
                    tally: Tally, *, cloudevents_source: str | None = None, stored: str = "",
                    compacted: bool = False, on_row: Callable[[], None] | None = None) -> None:
    """Judge one partition into `tally`. `rows`: (row, recorded offset) by offset then id; `records`:
    the records read back from [min, max] of those offsets, by offset. `stored`, when not empty, says
    why nothing could be read (the topic or partition is unknown to the broker), for the missing.
    `compacted`: the topic's cleanup.policy includes compact (see the module's `compacted`)."""
    seen: dict[int, _Seen] = {}
    last_key_offset: dict[bytes, int] = {}  # compacted: key -> the highest offset of a record of it read
    last_of_key: dict[str, tuple[int, int, int]] = {}  # key -> (xid, id, offset) of its latest row in offset order
    # (id, recorded offset, hash of the expected content, reason, whether its record carries its id,
    # the record's key when compacted and the offset is a gap, else None)
    suspects: list[tuple[int, int, int, str, bool, bytes | None]] = []
    tally.partitions += 1

    def note(record: StoredRecord) -> StoredRecord:
        event_id = record_event_id(record)
        if event_id is not None:
            entry = seen.get(event_id)
            if entry is None:
                entry = seen[event_id] = _Seen()
            entry.copies += 1
            if entry.copies == 1:
                entry.first_offset = record.offset
                entry.content = hash((record.key, record.value))
        if compacted and record.key is not None:
            last_key_offset[record.key] = record.offset
        return record

    reading: Iterator[StoredRecord] = map(note, records)
    current = next(reading, None)
    for row, offset in rows:
        tally.rows += 1
        while current is not None and current.offset < offset:
            current = next(reading, None)
        identified = has_event_id(row, cloudevents_source)
        if identified:
            entry = seen.get(row.id)
            if entry is None:
                entry = seen[row.id] = _Seen()
            entry.audited = True
        where = {"id": row.id, "topic": topic, "partition": partition, "offset": offset}
        if current is None or current.offset != offset:
            reason = stored or "offset not stored"
            key = record_key(row)
            suspects.append((row.id, offset, hash((key, row.payload)), reason, identified,
                             key if compacted and not stored else None))
        else:
            finding = compare(row, current, cloudevents_source)
            if finding is not None and finding.kind != ALTERED:
                other = finding.found_event_id
                reason = f"holds event {other}" if other is not None else "holds a record without an event id"
                suspects.append((row.id, offset, hash((record_key(row), row.payload)), reason, identified, None))
            else:
                if finding is None:
                    tally.equal += 1
                else:
                    tally.add("altered", where | {"differs": list(finding.differs)})
                _check_order(row, offset, last_of_key, tally, topic, partition)
        if on_row is not None:
            on_row()
    for _ in reading:  # the rest of the range: copies beyond the last recorded offset
        pass

    for event_id, offset, content, reason, identified, key in suspects:
        entry = seen.get(event_id) if identified else None  # without its id, a record is judged where recorded only
        where = {"id": event_id, "topic": topic, "partition": partition, "offset": offset}
        if entry is None or entry.copies == 0:
            if key is not None and last_key_offset.get(key, -1) > offset:
                tally.compacted += 1  # superseded by a later record of its key, which the range holds
                continue
            tally.add("missing", where | {"reason": reason})
            continue
        tally.relocated += 1
        if entry.content != content:
            tally.add("altered", where | {"storedAt": entry.first_offset, "differs": ["key or value"]})
    for event_id, entry in seen.items():
        if entry.audited and entry.copies > 1:
            tally.add("duplicated", {"id": event_id, "topic": topic, "partition": partition,
                                     "copies": entry.copies, "firstOffset": entry.first_offset})
            tally.extra_copies += entry.copies - 1


def _check_order(row: Row, offset: int, last_of_key: dict[str, tuple[int, int, int]], tally: Tally,
                 topic: str, partition: int) -> None:
    if row.key is None:
        return
    last = last_of_key.get(row.key)
    if last is not None and (row.xid, row.id) < last[:2]:
        tally.add("outOfOrder", {"id": row.id, "topic": topic, "partition": partition, "offset": offset,
                                 "key": row.key, "after": last[1], "afterOffset": last[2]})
        return  # the key's latest stays the one it came after
    last_of_key[row.key] = (row.xid, row.id, offset)
