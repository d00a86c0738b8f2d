"""The audit's judgement of one partition from rows and records given in memory
(kaireon_pub/audit/partition.py): missing, altered, duplicated, out of order, and what is none of them."""

from __future__ import annotations

from kaireon_pub.audit.broker import StoredRecord
from kaireon_pub.audit.partition import Tally, audit_partition
from kaireon_pub.worker.kafka.records import record_headers, record_key
from kaireon_pub.worker.rows import Row

CREATED = "2026-12-02T00:00:00.000000Z"


def row(event_id: int, key: str | None = "k", xid: int | None = None, payload: bytes | None = None) -> Row:
    return Row(event_id, "t", key, payload if payload is not None else b'{"n":%d}' % event_id, "{}", None, 0, 0,
               xid if xid is not None else 1000 + event_id, 0.0, CREATED)


def record(r: Row, offset: int, **changes) -> StoredRecord:
    fields = {"topic": "t", "partition": 0, "offset": offset, "key": record_key(r), "value": r.payload,
              "headers": tuple(record_headers(r))}
    return StoredRecord(**(fields | changes))


def judge(rows: list[tuple[Row, int]], records: list[StoredRecord], **kwargs) -> Tally:
    tally = Tally()
    audit_partition("t", 0, rows, records, tally, **kwargs)
    return tally


def ids(tally: Tally, kind: str) -> list[int]:
    return [event["id"] for event in tally.events[kind]]


def test_every_row_at_its_recorded_offset_is_clean():
    rows = [(row(i), i - 1) for i in range(1, 6)]
    tally = judge(rows, [record(r, o) for r, o in rows])
    assert tally.findings == 0 and tally.equal == 5 and tally.rows == 5
    assert tally.summary().startswith("audit: clean: 5 events checked in 1 partition,")
    assert tally.as_json()["clean"] is True


def test_rows_whose_offset_is_not_stored_or_holds_another_event_are_missing_exactly_those():
    rows = [(row(i), i - 1) for i in range(1, 6)]
    records = [record(r, o) for r, o in rows if r.id != 2]  # a gap at offset 1
    made_up = [(row(10), 3), (row(11), 99)]  # offset 3 holds event 4; 99 is past the end
    tally = judge(sorted(rows + made_up, key=lambda pair: (pair[1], pair[0].id)), records)
    assert sorted(ids(tally, "missing")) == [2, 10, 11]
    reasons = {event["id"]: event["reason"] for event in tally.events["missing"]}
    assert reasons == {2: "offset not stored", 10: "holds event 4", 11: "offset not stored"}
    assert tally.counts == {"missing": 3, "altered": 0, "duplicated": 0, "outOfOrder": 0}
    assert tally.equal == 4


def test_a_partition_the_broker_does_not_hold_makes_every_row_missing_with_the_reason():
    tally = judge([(row(1), 0), (row(2), 1)], [], stored="topic not on the broker")
    assert ids(tally, "missing") == [1, 2]
    assert {event["reason"] for event in tally.events["missing"]} == {"topic not on the broker"}


def test_an_altered_value_or_key_is_reported_with_what_differs():
    a, b, c = row(1), row(2), row(3)
    tally = judge([(a, 0), (b, 1), (c, 2)],
                  [record(a, 0), record(b, 1, value=b"changed"), record(c, 2, key=b"other")])
    assert ids(tally, "altered") == [2, 3]
    assert [event["differs"] for event in tally.events["altered"]] == [["value"], ["key"]]
    assert tally.counts["missing"] == 0


def test_copies_of_an_event_elsewhere_in_the_range_are_duplicates_counting_the_extra_copies():
    rows = [(row(i), i - 1) for i in range(1, 5)]
    records = [record(r, o) for r, o in rows]
    records += [record(rows[0][0], 4), record(rows[0][0], 5), record(rows[2][0], 6)]
    tally = judge(rows, records)
    assert sorted(ids(tally, "duplicated")) == [1, 3]
    assert tally.counts["duplicated"] == 2 and tally.extra_copies == 3
    copies = {event["id"]: event["copies"] for event in tally.events["duplicated"]}
    assert copies == {1: 3, 3: 2}
    assert tally.equal == 4 and tally.counts["missing"] == 0
    assert "(3 extra copies)" in tally.summary()


def test_copies_of_events_outside_the_window_are_not_this_audits():
    a = row(1)
    outsider = row(50)
    tally = judge([(a, 0)], [record(a, 0), record(outsider, 1), record(outsider, 2)])
    assert tally.findings == 0


def test_a_keys_records_in_another_order_than_the_tables_are_out_of_order():
    first, second, third = row(1, xid=100), row(2, xid=100), row(3, xid=101)
    other = row(4, key="other", xid=99)
    # produced: third, first, other, second: first and second come after third
    placed = [(third, 0), (first, 1), (other, 2), (second, 3)]
    tally = judge(placed, [record(r, o) for r, o in placed])
    assert ids(tally, "outOfOrder") == [1, 2]
    assert tally.events["outOfOrder"][0] == {"id": 1, "topic": "t", "partition": 0, "offset": 1, "key": "k",
                                             "after": 3, "afterOffset": 0}
    assert tally.counts["missing"] == tally.counts["altered"] == 0


def test_table_order_is_xid_then_id_and_rows_without_a_key_have_no_order():
    late_id_early_xid, early_id_late_xid = row(9, xid=100), row(2, xid=200)
    keyless = [(row(5, key=None), 2), (row(3, key=None), 3)]
    placed = [(late_id_early_xid, 0), (early_id_late_xid, 1)] + keyless
    tally = judge(placed, [record(r, o) for r, o in placed])
    assert tally.findings == 0


def test_an_event_stored_at_another_offset_is_relocated_not_missing():
    a, b = row(1), row(2)
    # recorded at 0 and 1; stored the other way round (a replay that kept the first positions)
    tally = judge([(a, 0), (b, 1)], [record(b, 0), record(a, 1)])
    assert tally.findings == 0 and tally.relocated == 2
    changed = judge([(a, 0), (b, 1)], [record(b, 0, value=b"x"), record(a, 1)])
    assert ids(changed, "altered") == [2] and changed.events["altered"][0]["storedAt"] == 0


def test_the_sample_is_capped_while_the_counts_stay_exact(monkeypatch):
    monkeypatch.setattr("kaireon_pub.audit.partition.SAMPLE", 3)
    tally = judge([(row(i), i) for i in range(1, 11)], [])
    doc = tally.as_json()["findings"]["missing"]
    assert doc["count"] == 10 and len(doc["events"]) == 3 and doc["truncated"] is True


def test_on_row_is_called_once_per_row():
    calls = []
    judge([(row(1), 0), (row(2), 1)], [], on_row=lambda: calls.append(1))
    assert len(calls) == 2


def test_a_row_whose_record_carries_no_event_id_is_judged_at_its_recorded_offset_only():
    own_only = row(5)._replace(headers='{"id": "uuid-5", "kaireon-headers": "own-only"}')
    stored = record(own_only, 0)
    assert stored.headers == (("id", b"uuid-5"),)
    assert judge([(own_only, 0)], [stored]).equal == 1
    # Not at its offset: missing, even when a record elsewhere carries an event-id equal to its row id.
    tally = judge([(own_only, 0)], [record(row(9), 0), record(row(5), 1)])
    assert ids(tally, "missing") == [5] and tally.relocated == 0 and tally.counts["duplicated"] == 0


def test_on_a_compacted_topic_a_gap_superseded_by_a_later_record_of_its_key_is_compacted_not_missing():
    """The broker compacted offset 0 away (key a, superseded at offset 2): a compacted topic's normal
    state. A gap whose key has no later record in the range is still missing, and so is every gap on
    a topic that is not compacted."""
    rows = [(row(1, "a"), 0), (row(2, "b"), 1), (row(3, "a"), 2), (row(4, "c"), 3), (row(5, "d"), 4)]
    records = [record(rows[1][0], 1), record(rows[2][0], 2), record(rows[4][0], 4)]  # 0 and 3 are gone
    tally = judge(rows, records, compacted=True)
    assert ids(tally, "missing") == [4] and tally.compacted == 1 and tally.equal == 3
    assert tally.as_json()["compacted"] == 1 and "1 compacted" in tally.summary()
    plain = judge(rows, records)
    assert ids(plain, "missing") == [1, 4] and plain.compacted == 0
    # A later record of its key at a lower offset, or the key's only record gone, is no excuse.
    assert ids(judge([(row(3, "a"), 2)], [record(row(1, "a"), 1)], compacted=True), "missing") == [3]
    # Nothing read at all (the topic unknown to the broker): missing, whatever the policy.
    assert ids(judge(rows[:1], [], compacted=True, stored="topic not on the broker"), "missing") == [1]


def test_on_a_compacted_topic_another_event_at_the_recorded_offset_is_still_a_finding():
    tally = judge([(row(1, "a"), 0)], [record(row(9, "a"), 0), record(row(10, "a"), 1)], compacted=True)
    assert ids(tally, "missing") == [1] and tally.compacted == 0
