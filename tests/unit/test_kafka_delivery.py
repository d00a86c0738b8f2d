"""One batch's delivery reports and its close-out (worker/kafka/delivery.py), without a producer:
which bucket each report fills, when the batch's wait ends, what counts as released and as
unconfirmed."""

from __future__ import annotations

import asyncio
import threading

import pytest
from confluent_kafka import KafkaError, Message

from kaireon_pub.worker.kafka.delivery import Batch
from kaireon_pub.worker.rows import Row


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def settle(loop: asyncio.AbstractEventLoop) -> None:
    """Run what the reports scheduled on the loop (wake-ups), then return."""
    loop.run_until_complete(asyncio.sleep(0))


def rows(n: int) -> list[Row]:
    return [Row(i, "t", f"k{i}", b"{}", "{}", None, 0, 0, 1000 + i, 0.0, "2026-12-02T00:00:00.000000Z")
            for i in range(1, n + 1)]


def landed(event_id: int, partition: int = 0) -> Message:
    """The message of a delivery report: the event delivered at offset `event_id`."""
    return Message(topic="t", partition=partition, offset=event_id)


def err(code: int, **kwargs) -> KafkaError:
    return KafkaError(code, **kwargs)


def test_each_report_fills_its_bucket(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, None, landed(1))
    batch.report(2, 0.0, err(KafkaError.INVALID_RECORD, reason="no key"), None)
    batch.report(3, 0.0, err(KafkaError._UNKNOWN_TOPIC, reason="no topic"), None)
    batch.report(4, 0.0, err(KafkaError._MSG_TIMED_OUT, reason="first"), None)
    batch.report(5, 0.0, err(KafkaError._MSG_TIMED_OUT, reason="second"), None)
    batch.report(6, 0.0, err(KafkaError.TOPIC_AUTHORIZATION_FAILED, reason="a"), None)
    batch.report(7, 0.0, err(KafkaError.TOPIC_AUTHORIZATION_FAILED, reason="b"), None)
    out = batch.out
    assert out.delivered == [1] and len(out.ages) == 1 and out.ages[0] > 0
    assert out.rejected == {2: "INVALID_RECORD: no key"}
    assert out.retry == {3: "_UNKNOWN_TOPIC: no topic"}
    assert out.transient_error == "_MSG_TIMED_OUT: first"  # the first one says why
    assert out.systemic_error == "TOPIC_AUTHORIZATION_FAILED: b"
    assert out.producer_error is None and batch.reported == 7


def test_the_first_producer_error_is_kept_and_ends_the_wait_before_every_row_is_produced(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, err(KafkaError._FENCED, reason="fenced"), None)
    batch.report(2, 0.0, err(KafkaError.UNKNOWN, reason="later", fatal=True), None)
    settle(loop)
    assert batch.out.producer_error == "_FENCED: fenced"
    assert batch.done.done() and not batch.produced_all


def test_the_wait_ends_when_the_last_report_meets_the_handed_count(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, None, landed(1))
    batch.produced(2)  # two handed, one reported: not done
    settle(loop)
    assert not batch.done.done()
    batch.report(2, 0.0, None, landed(2))
    settle(loop)
    assert batch.done.done()


def test_a_next_wave_waits_for_its_own_count(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, None, landed(1))
    batch.produced(1)
    assert batch.done.done()
    batch.more()  # a second wave: its records' reports do not end the wait before it is produced
    assert not batch.done.done() and not batch.produced_all
    batch.report(2, 0.0, None, landed(2))
    settle(loop)
    assert not batch.done.done()
    batch.produced(3)
    batch.report(3, 0.0, None, landed(3))
    settle(loop)
    assert batch.done.done() and batch.out.delivered == [1, 2, 3]


def test_every_report_in_before_the_rows_are_all_produced_ends_the_wait_at_once(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, None, landed(1))
    batch.produced(1)
    assert batch.done.done()  # no round trip through the loop


def test_reports_on_the_delivery_thread_wake_the_waiting_loop():
    async def main() -> Batch:
        batch = Batch(asyncio.get_running_loop())
        batch.produced(50)
        threads = [threading.Thread(target=batch.report, args=(i, 0.0, None, landed(i, i % 3))) for i in range(1, 51)]
        for t in threads:
            t.start()
        await asyncio.wait_for(batch.done, 5)
        for t in threads:
            t.join(5)
        return batch
    batch = asyncio.run(main())
    assert sorted(batch.out.delivered) == list(range(1, 51)) and batch.reported == 50
    out = batch.out  # each event's position stays in step with it, whatever thread reported it
    assert out.offsets == out.delivered and out.partitions == [i % 3 for i in out.delivered]


def test_close_says_unconfirmed_when_a_handed_record_was_not_reported_and_later_reports_change_nothing(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, None, landed(1))
    batch.produced(3)
    assert batch.close() is True
    batch.report(2, 0.0, err(KafkaError._PURGE_QUEUE), None)  # the purge reports the rest: ignored
    batch.report(3, 0.0, None, landed(3))
    assert batch.reported == 1 and batch.out.delivered == [1] and batch.out.transient_error is None


def test_close_before_the_rows_were_all_produced_is_not_unconfirmed(loop):
    batch = Batch(loop)  # the loop raised (say, cancelled) before produced()
    batch.report(1, 0.0, None, landed(1))
    assert batch.close() is False


def test_close_when_every_handed_record_was_reported(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, err(KafkaError._MSG_TIMED_OUT), None)
    batch.produced(1)
    assert batch.close() is False


def test_release_puts_back_every_unsettled_row_in_order_and_counts_the_handed_ones_unconfirmed(loop):
    batch = Batch(loop)
    batch.report(2, 0.0, None, landed(2))
    batch.report(3, 0.0, err(KafkaError.INVALID_RECORD), None)
    batch.report(4, 0.0, err(KafkaError._UNKNOWN_TOPIC), None)
    batch.report(5, 0.0, err(KafkaError._MSG_TIMED_OUT), None)  # handed, reported, released
    batch.produced(5)  # 1 and 6 were handed, never reported; 7 and 8 were not handed
    batch.close()
    batch.release(rows(8), unhanded={7, 8})
    out = batch.out
    assert out.released == [1, 5, 6, 7, 8]
    assert out.unconfirmed == 3  # 1, 5, 6: the broker may have them; 7, 8 never left the worker


def test_a_poison_row_is_rejected_not_released_and_not_unconfirmed(loop):
    batch = Batch(loop)
    batch.out.rejected[2] = "headers are not valid JSON"  # the loop's own verdict: never handed
    batch.report(1, 0.0, None, landed(1))
    batch.produced(1)
    batch.close()
    batch.release(rows(3), unhanded={2, 3})
    assert batch.out.released == [3] and batch.out.unconfirmed == 0


def test_release_when_every_row_is_delivered_releases_nothing(loop):
    batch = Batch(loop)
    for i in (1, 2):
        batch.report(i, 0.0, None, landed(i))
    batch.produced(2)
    batch.close()
    batch.release(rows(2), unhanded=set())
    assert batch.out.released == [] and batch.out.unconfirmed == 0


def test_a_delivered_event_keeps_where_it_landed_in_step_with_its_id(loop):
    batch = Batch(loop)
    batch.report(7, 0.0, None, landed(70, partition=2))
    batch.report(3, 0.0, err(KafkaError._MSG_TIMED_OUT), None)  # not delivered: no position
    batch.report(5, 0.0, None, landed(0, partition=11))
    batch.report(4, 0.0, err(KafkaError.INVALID_RECORD), None)
    batch.report(6, 0.0, None, landed(2**40, partition=0))
    out = batch.out
    assert list(zip(out.delivered, out.partitions, out.offsets, strict=True)) == [(7, 2, 70), (5, 11, 0), (6, 0, 2**40)]


@pytest.mark.parametrize("reported", [-1001, -1], ids=["OFFSET_INVALID", "DUPLICATE_SEQUENCE_NUMBER"])
def test_an_offset_librdkafka_reports_negative_is_no_offset(loop, reported):
    # librdkafka reports OFFSET_INVALID (-1001) for a record acknowledged without an offset, and -1
    # for a retry the broker recognised as a duplicate: delivered, its offset unknown. The client's
    # Message.offset() gives None for both; the row's published_offset is NULL (test_worker_settle).
    batch = Batch(loop)
    batch.report(1, 0.0, None, Message(topic="t", partition=4, offset=reported))
    batch.report(2, 0.0, None, landed(9, partition=4))
    out = batch.out
    assert (out.delivered, out.partitions, out.offsets) == ([1, 2], [4, 4], [None, 9])


def test_the_batch_trace_sees_each_report_once_and_none_after_close(loop):
    seen = []

    class Trace:
        def reported(self, event_id, error, msg):
            seen.append((event_id, error.name() if error else None, msg))
    batch = Batch(loop)
    batch.trace = Trace()
    msg = landed(1)
    batch.report(1, 0.0, None, msg)
    batch.report(2, 0.0, err(KafkaError._MSG_TIMED_OUT), None)
    batch.produced(3)
    batch.close()
    batch.report(3, 0.0, None, landed(3))
    assert seen == [(1, None, msg), (2, "_MSG_TIMED_OUT", None)]


# ---- a record batch the broker refused whole (MSG_SIZE_TOO_LARGE, RECORD_LIST_TOO_LARGE) ----------


def test_records_refused_with_a_record_batch_they_shared_are_released_as_suspects_never_unconfirmed(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, None, landed(1))
    batch.report(2, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE), None)
    batch.report(3, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE), None)
    batch.report(4, 0.0, err(KafkaError.RECORD_LIST_TOO_LARGE), None)
    batch.produced(4)
    settle(loop)
    assert batch.done.done()  # a refusal is a report like any other
    batch.close()
    batch.release(rows(5), unhanded={5})
    out = batch.out
    assert out.rejected == {} and out.retry == {} and out.transient_error is None
    assert out.suspects == [2, 3, 4] and out.released == [2, 3, 4, 5]
    assert out.unconfirmed == 0  # the broker refused them: it has none


def test_a_record_refused_while_alone_in_its_wave_is_rejected(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, None, landed(1))
    batch.report(2, 0.0, None, landed(2))
    batch.produced(2)
    batch.more()  # the next wave hands one record over: its record batch holds it alone
    batch.report(3, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE, reason="too big"), None)
    batch.produced(3)
    batch.close()
    batch.release(rows(3), unhanded=set())
    out = batch.out
    assert out.rejected == {3: "MSG_SIZE_TOO_LARGE: too big"} and out.suspects == [] and out.released == []


def test_a_refusal_reported_before_the_wave_is_counted_waits_for_the_count(loop):
    alone = Batch(loop)
    alone.report(1, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE), None)  # before produced(): judged later
    alone.produced(1)
    alone.close()
    shared = Batch(loop)
    shared.report(1, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE), None)
    shared.report(2, 0.0, None, landed(2))
    shared.produced(2)
    shared.close()
    assert list(alone.out.rejected) == [1] and alone.out.suspects == []
    assert shared.out.rejected == {} and shared.out.suspects == [1]


def test_each_wave_is_judged_on_its_own(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE), None)
    batch.report(2, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE), None)
    batch.produced(2)
    batch.more()  # wave 1 shared: suspects
    batch.report(3, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE), None)
    batch.produced(3)
    batch.more()  # wave 2 alone: rejected
    batch.report(4, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE), None)
    batch.report(5, 0.0, None, landed(5))
    batch.produced(5)
    batch.close()  # wave 3 shared
    assert batch.out.suspects == [1, 2, 4] and list(batch.out.rejected) == [3]


def test_a_refusal_before_the_rows_were_all_produced_is_a_suspect(loop):
    batch = Batch(loop)  # the loop raised before produced(): how many the wave handed is unknown
    batch.report(1, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE), None)
    batch.close()
    assert batch.out.suspects == [1] and batch.out.rejected == {}


def test_the_records_librdkafka_says_another_invalid_record_failed_are_released_never_unconfirmed(loop):
    batch = Batch(loop)
    batch.report(1, 0.0, err(KafkaError._INVALID_DIFFERENT_RECORD), None)
    batch.report(2, 0.0, err(KafkaError.INVALID_RECORD, reason="compacted topic: no key"), None)
    batch.report(3, 0.0, err(KafkaError._INVALID_DIFFERENT_RECORD), None)
    batch.produced(3)
    batch.close()
    batch.release(rows(3), unhanded=set())
    out = batch.out
    assert out.rejected == {2: "INVALID_RECORD: compacted topic: no key"} and out.retry == {}
    assert out.released == [1, 3] and out.unconfirmed == 0 and out.suspects == []
    assert out.transient_error is None


def test_a_refused_records_span_ends_with_the_batch_as_judged(loop):
    seen = []

    class Trace:
        def reported(self, event_id, error, msg):
            seen.append(event_id)
    batch = Batch(loop)
    batch.trace = Trace()
    batch.report(1, 0.0, err(KafkaError.MSG_SIZE_TOO_LARGE), None)
    batch.report(2, 0.0, err(KafkaError._MSG_TIMED_OUT), None)
    assert seen == [2]  # the span of 1 is ended by trace.end(out), as rejected or released
