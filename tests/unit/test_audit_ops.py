"""The audit and locate commands' own logic, without services: the window's times, the text they print."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kaireon_pub.audit.partition import Tally
from kaireon_pub.ops import audit as ops_audit
from kaireon_pub.ops import locate as ops_locate

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-12-06T09:30:00Z", datetime(2026, 12, 6, 9, 30, tzinfo=UTC)),
    ("2026-12-06T09:30:00", datetime(2026, 12, 6, 9, 30, tzinfo=UTC)),  # no zone: UTC
    ("2026-12-06T10:30:00+01:00", datetime(2026, 12, 6, 9, 30, tzinfo=UTC)),
    ("2026-12-06", datetime(2026, 12, 6, tzinfo=UTC)),
    ("90s", NOW - timedelta(seconds=90)), ("30m", NOW - timedelta(minutes=30)),
    ("6h", NOW - timedelta(hours=6)), ("7d", NOW - timedelta(days=7)), ("1.5h", NOW - timedelta(minutes=90)),
])
def test_a_time_is_iso_8601_or_a_duration_ago(text, expected):
    assert ops_audit.parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "6 hours", "-1h", "2026-13-01"])
def test_other_times_are_refused(text):
    with pytest.raises(ValueError):
        ops_audit.parse_when(text, NOW)


def test_the_text_lists_findings_per_kind_then_the_summary_line(monkeypatch):
    monkeypatch.setattr(ops_audit, "SHOW", 2)
    tally = Tally(rows=10, equal=4, partitions=2)
    for i in range(3):
        tally.add("missing", {"id": i, "topic": "t", "partition": 0, "offset": i, "reason": "offset not stored"})
    tally.add("duplicated", {"id": 7, "topic": "t", "partition": 1, "copies": 2, "firstOffset": 5})
    tally.add("outOfOrder", {"id": 8, "topic": "t", "partition": 1, "offset": 9, "key": "k", "after": 9,
                             "afterOffset": 8})
    tally.add("altered", {"id": 9, "topic": "t", "partition": 1, "offset": 10, "differs": ["value"]})
    lines = ops_audit.render(tally).splitlines()
    assert lines == [
        "missing: event 0 t[0]@0: offset not stored",
        "missing: event 1 t[0]@1: offset not stored",
        "missing: ... 1 more (--json lists up to 3)",
        "altered: event 9 t[1]@10: value differs",
        "duplicated: event 7 t[1]: 2 copies, the first at 5",
        "out of order: event 8 t[1]@9: key 'k' after event 9 at 8",
        "audit: 6 findings: 10 events checked in 2 partitions, 3 missing, 1 altered, 1 duplicated, 1 out of order; "
        "0 relocated, 0 unverifiable (no recorded position)",
    ]


def test_locate_says_what_it_found_in_one_line_about_the_broker():
    doc = {"id": 5, "status": "published", "attempts": 1, "lastError": None, "createdAt": "c", "publishedAt": "p",
           "nextAttemptAt": None, "deadLetteredAt": None, "topic": "orders", "key": "k",
           "position": {"partition": 2, "offset": 40}}
    equal = ops_locate.render(doc | {"result": "equal", "broker": {}})
    assert "landed orders[2]@40" in equal and "broker: equal" in equal
    differs = ops_locate.render(doc | {"result": "differs", "broker": {"differs": ["key", "value"]}})
    assert "broker: differs: key and value" in differs
    missing = ops_locate.render(doc | {"result": "missing on the broker",
                                       "broker": {"reason": "offset 40 holds event 6"}})
    assert "broker: missing: offset 40 holds event 6" in missing
    pending = ops_locate.render(doc | {"status": "failed", "lastError": "MSG_SIZE_TOO_LARGE", "position": None,
                                       "result": "not published"})
    assert "last error: MSG_SIZE_TOO_LARGE" in pending and "not published yet" in pending
    assert ops_locate.render({"id": 3, "result": "no such row"}).startswith("event 3: no such row")
