"""ShardScan without services: cursors and rewinds, rescans due and full, rotation, the shards that
come and go, and rows another session locks noted and forgotten."""

from __future__ import annotations

import logging

import pytest

from kaireon_pub import metrics
from kaireon_pub.worker.rows import Row
from tests.unit.worker_fakes import Clock, raw, scan, value


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_take_claimed_orders_rows_and_moves_each_shard_cursor_past_every_row_looked_at(clock):
    s = scan(clock, batch_size=10)
    rows = s.take_claimed([raw(5, 1, 20), raw(3, 1, 10), raw(9, 2, 7, topic=None, attempts=None)])
    assert [r.id for r in rows] == [3, 5]  # (xid, id) order; the held row is not claimed
    assert all(isinstance(r, Row) for r in rows)
    assert s.cursors == {1: (20, 5), 2: (7, 9)}  # past the held row too
    assert s.last_claim_full is False and s.busy == {}
    s.take_claimed([raw(1, 1, 15)])
    assert s.cursors[1] == (20, 5)  # a cursor never moves back by a claim


def test_take_claimed_full_batch_and_column_check(clock):
    s = scan(clock, batch_size=2)
    s.take_claimed([raw(1, 1, 1), raw(2, 1, 2)])
    assert s.last_claim_full is True
    with pytest.raises(TypeError):
        s.take_claimed([raw(1, 1, 1) + ("extra",)])


def test_cursor_params_start_unknown_shards_at_zero(clock):
    s = scan(clock)
    s.cursors = {2: (7, 9)}
    assert s.cursor_params([2, 5]) == {"cursor_xids": "{7,0}", "cursor_ids": "{9,0}"}


def test_rewind_moves_a_cursor_back_only(clock):
    s = scan(clock)
    s.cursors = {1: (50, 50)}
    s.rewind(1, (60, 0))
    s.rewind(2, (1, 1))  # no cursor: the shard's scan starts at its beginning anyway
    assert s.cursors == {1: (50, 50)}
    s.rewind(1, (10, 9))
    assert s.cursors == {1: (10, 9)}


def test_rewind_every_moves_back_each_cursor_past_the_position_and_starts_none(clock):
    # A passed-over transaction ended (worker/horizon.py): its rows may sit behind any shard's cursor.
    s = scan(clock)
    s.cursors = {1: (100, 5), 2: (40, 1), 3: (50, 0), 4: (50, 7)}
    s.rewind_every((50, 0))
    assert s.cursors == {1: (50, 0), 2: (40, 1), 3: (50, 0), 4: (50, 0)}  # shard 2 is before it: stays
    s.cursors = {}
    s.rewind_every((1, 0))
    assert s.cursors == {}  # a shard with no cursor scans from its start anyway: none is made


def test_apply_rescans_due_shards_then_full_rescan(clock):
    s = scan(clock, rescan_interval_s=10)
    s.cursors = {1: (5, 5), 2: (6, 6)}
    s.rescan_at = {1: clock.now + 1, 2: clock.now + 5}
    s.busy = {1: {"k": (5, 5)}}
    clock.now += 2
    s.apply_rescans()
    assert s.cursors == {2: (6, 6)} and s.rescan_at == {2: clock.now + 3} and s.busy == {}
    s.busy = {2: {"k": (6, 6)}}
    clock.now += 10
    s.apply_rescans()
    assert s.cursors == {} and s.rescan_at == {} and s.busy == {}
    assert s.next_full_rescan == clock.now + 10


def test_rescan_after_keeps_the_earliest_due_time(clock):
    s = scan(clock)
    s.rescan_after(1, 4.0)
    s.rescan_after(1, 9.0)
    s.rescan_after(2, -1.0)  # due already: at once
    assert s.rescan_at == {1: pytest.approx(clock.now + 4.01), 2: pytest.approx(clock.now + 0.01)}
    s.full_rescan_now()
    s.cursors = {1: (1, 1)}
    s.apply_rescans()
    assert s.cursors == {} and s.rescan_at == {}


def test_shards_changed_forgets_cursors_of_shards_that_came_or_went(clock):
    s = scan(clock)
    s.cursors = {1: (1, 1), 2: (2, 2), 3: (3, 3), 4: (4, 4)}
    s.rescan_at = {2: 1.0, 3: 1.0, 4: 1.0}
    s.busy = {1: {"k": (1, 1)}, 4: {"k": (4, 4)}}
    s.shards_changed([], [2, 3])
    assert s.cursors == {1: (1, 1), 4: (4, 4)} and s.rescan_at == {4: 1.0}
    s.shards_changed([1], [])
    assert s.cursors == {4: (4, 4)} and s.busy == {4: {"k": (4, 4)}}


def test_rescan_all_clears_every_cursor_and_busy_row(clock):
    s = scan(clock)
    s.cursors, s.busy, s.rescan_at = {1: (1, 1)}, {1: {"k": (1, 1)}}, {1: 5.0}
    s.rescan_all()
    assert (s.cursors, s.busy, s.rescan_at) == ({}, {}, {1: 5.0})


def test_forget_cursors_starts_every_shard_afresh_and_keeps_rescans_and_busy_rows(clock):
    s = scan(clock)
    s.take_claimed([raw(5, 1, 20), raw(9, 2, 7)])
    s.busy, s.rescan_at = {1: {"k": (3, 3)}}, {2: 5.0}
    s.forget_cursors()
    assert (s.cursors, s.busy, s.rescan_at) == ({}, {1: {"k": (3, 3)}}, {2: 5.0})
    assert s.cursor_params([1, 2]) == {"cursor_xids": "{0,0}", "cursor_ids": "{0,0}"}


def test_rotation_starts_each_claim_one_shard_further(clock):
    s = scan(clock)
    owned = {3: 1, 1: 1, 2: 1}
    assert [s.rotated(owned) for _ in range(3)] == [[2, 3, 1], [3, 1, 2], [1, 2, 3]]
    assert s.rotated({}) == []


def test_busy_rows_noted_once_per_lock_and_forgotten_by_the_rescan(clock, caplog):
    s = scan(clock, strict=True)
    caplog.set_level(logging.WARNING, "kaireon_pub.worker")
    s.take_claimed([raw(8, 1, 8, topic=None, attempts=0), raw(4, 1, 4, topic=None, attempts=1, key="k")])
    assert s.busy == {1: {"k": (4, 4)}}  # each key's first busy row
    assert s.rescan_at[1] == clock.now + 1.0 and s.careful()
    assert value(metrics.LOCKED_EVENTS) == 1
    s.note_busy([raw(4, 1, 4, topic=None, attempts=1)])  # met again: the same lock, no new line
    lines = [r for r in caplog.records if getattr(r, "event", None) == "event locked by another session"]
    assert [(r.eventId, r.shard) for r in lines] == [(4, 1), (8, 1)]
    params = s.with_busy({"x": 1})
    assert params == {"x": 1, "busy_shards": "{1}", "busy_keys": ["k"], "busy_xids": "{4}", "busy_ids": "{4}"}
    clock.now += 1.5
    s.apply_rescans()  # the shard's scan starts again: the busy rows are learnt afresh
    assert s.busy == {} and value(metrics.LOCKED_EVENTS) == 0
    assert s.careful()  # a while longer: the rescan meets them again
    clock.now += 3
    assert not s.careful()
    clock.now += 10  # long after: the same event locked again is a new line
    s.note_busy([raw(4, 1, 4, topic=None, attempts=1)])
    assert len([r for r in caplog.records if getattr(r, "event", None) == "event locked by another session"]) == 3


def test_busy_row_with_a_later_position_keeps_the_earlier_one(clock):
    s = scan(clock)
    s.note_busy([raw(4, 1, 4, topic=None)])
    s.note_busy([raw(9, 1, 9, topic=None)])
    assert s.busy == {1: {"k": (4, 4)}}


def test_busy_rows_relaxed_count_the_key_flowing_past(clock):
    s = scan(clock, strict=False)
    before = value(metrics.ORDER_VIOLATIONS)
    s.note_busy([raw(7, 2, 7, topic=None, attempts=0), raw(9, 2, 9, topic=None, attempts=0, key=None)])
    assert value(metrics.ORDER_VIOLATIONS) == before + 1  # a NULL key holds nothing back


def test_met_locked_row_counts_and_stays_careful_a_while(clock):
    s = scan(clock)
    before = value(metrics.CLAIM_LOCK_CONFLICTS)
    assert not s.careful()
    s.met_locked_row()
    assert value(metrics.CLAIM_LOCK_CONFLICTS) == before + 1 and s.careful()
    clock.now += 3.0
    assert not s.careful()
