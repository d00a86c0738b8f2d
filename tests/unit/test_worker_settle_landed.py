"""Where each event landed (issue 27), as the marks send it: the delivered ids sorted ascending with
each one's partition and offset in the same order (queries.sql, landed_set, finds a row's position
by binary search over the ids), in both claim modes and in a lock-mode batch marked again; NULL for
an offset librdkafka reported as negative; nothing in delete-on-publish mode."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from kaireon_pub.db.queries import Q, int_array
from kaireon_pub.worker.kafka.outcome import BatchOutcome
from kaireon_pub.worker.rows import Row
from kaireon_pub.worker.settle import Unsettled, landed, nullable_int_array
from tests.unit.test_worker_settle import FakeConn, FakePool, make_settler
from tests.unit.worker_fakes import Clock, raw


@pytest.fixture
def clock() -> Clock:
    return Clock()


def delivered_out_of_order() -> BatchOutcome:
    """Reports in delivery order (partition by partition), not in id order; 20's offset unknown."""
    return BatchOutcome(delivered=[30, 10, 40, 20], partitions=[2, 0, 2, 1], offsets=[301, 100, 302, None])


SENT = {"ids": "{10,20,30,40}", "partitions": "{0,1,2,2}", "offsets": "{100,NULL,301,302}"}


def rows() -> list[Row]:
    return [Row(*raw(i, 1, i)) for i in (10, 20, 30, 40)]


def test_the_status_mark_sends_the_ids_sorted_with_where_each_landed(clock):
    st = make_settler(clock)
    conn = FakeConn()
    token = uuid.uuid4()
    asyncio.run(st.settle(FakePool(conn), token, rows(), delivered_out_of_order()))
    [(query, params)] = conn.statements
    assert query == Q.mark_published and params == {**SENT, "token": token}


def test_the_lock_mode_mark_and_the_mark_made_again_send_the_same_positions(clock):
    st = make_settler(clock, OUTBOX_CLAIM_MODE="lock")
    outcome = delivered_out_of_order()
    first = FakeConn()
    asyncio.run(st.write_outcome(first, None, rows(), outcome))
    [(query, params)] = first.statements
    assert query == Q.mark_published_locked and params == {**SENT, "token": None}
    # Its transaction rolled back (the server says aborted): marked again, where each landed with it.
    again = FakeConn()
    asyncio.run(st.settle_again(FakePool(again), None))
    assert [q for q, _ in again.statements] == [Q.xact_status, Q.mark_published_again]
    assert again.statements[1][1] == {**SENT, "token": None}


def test_delete_on_publish_sends_no_positions(clock):
    st = make_settler(clock, OUTBOX_DELETE_ON_PUBLISH="true")
    conn = FakeConn()
    asyncio.run(st.write_outcome(conn, uuid.uuid4(), rows(), delivered_out_of_order()))
    [(query, params)] = conn.statements
    assert query == Q.delete_published and set(params) == {"ids", "token"}
    assert params["ids"] == "{30,10,40,20}"  # as delivered: the delete needs no order


@pytest.mark.parametrize("reported", [None, -1001, -1], ids=["None", "OFFSET_INVALID", "DUPLICATE_SEQUENCE_NUMBER"])
def test_an_offset_librdkafka_reports_negative_is_stored_null_not_as_a_number(reported):
    # confluent-kafka gives None for a negative offset; a negative number itself is NULL all the same.
    assert nullable_int_array([7, reported, 2**62]) == "{7,NULL,4611686018427387904}"


def test_positions_without_an_unknown_one_are_int_array_exactly():
    values = [0, 12, 2**40]
    assert nullable_int_array(values) == int_array(values) == "{0,12,1099511627776}"
    assert nullable_int_array([]) == "{}"


def test_an_outcome_without_positions_marks_every_id_with_null():
    # None the tier makes (delivery.py fills the three lists together); no row may be left unmarked.
    assert landed(BatchOutcome(delivered=[3, 1, 2], partitions=[0])) == {
        "ids": "{1,2,3}", "partitions": "{NULL,NULL,NULL}", "offsets": "{NULL,NULL,NULL}"}


def test_a_batch_settled_again_in_status_mode_sends_the_positions_again(clock):
    st = make_settler(clock)
    token = uuid.uuid4()
    st.unsettled = Unsettled(token, rows(), delivered_out_of_order())
    conn = FakeConn()
    asyncio.run(st.settle_again(FakePool(conn), None))
    assert conn.statements == [(Q.mark_published, {**SENT, "token": token})]


def test_one_delivered_event_and_none_format_as_arrays_too():
    assert landed(BatchOutcome(delivered=[5], partitions=[2], offsets=[9])) == {
        "ids": "{5}", "partitions": "{2}", "offsets": "{9}"}
    assert landed(BatchOutcome(delivered=[5], partitions=[2], offsets=[None]))["offsets"] == "{NULL}"
    assert landed(BatchOutcome()) == {"ids": "{}", "partitions": "{}", "offsets": "{}"}
