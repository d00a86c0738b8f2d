"""ProducerHealth without a broker: stall detection, a producer error, the broker watch that
notices a different cluster, and the recreation line."""

from __future__ import annotations

import asyncio
import logging
import time

from kaireon_pub import metrics
from kaireon_pub.worker.health import BROKER_WATCH_INTERVAL_S, ProducerHealth
from kaireon_pub.worker.kafka.outcome import BatchOutcome
from tests.unit.worker_fakes import FakePublisher, value


def health(slot: int = 0, cluster_ids=()) -> ProducerHealth:
    h = ProducerHealth(slot)
    h.publisher = FakePublisher(cluster_ids)
    return h


def test_two_undelivered_batches_in_a_row_are_a_stall():
    h = health()
    h.after_batch(BatchOutcome(transient_error="timed out"))
    assert h.kafka_stalls == 1 and h.publisher.broken is None
    h.after_batch(BatchOutcome(transient_error="timed out"))
    assert h.publisher.broken == "two batches in a row undelivered: timed out"
    assert h.publisher.broken_cause == "stalled" and h.kafka_stalls == 0


def test_a_delivery_or_a_clean_batch_ends_the_stall_count():
    h = health()
    for outcome in (BatchOutcome(transient_error="t"), BatchOutcome(delivered=[1], transient_error="t"),
                    BatchOutcome(transient_error="t"), BatchOutcome()):
        h.after_batch(outcome)
    assert h.kafka_stalls == 0 and h.publisher.broken is None


def test_a_producer_error_is_the_cause_not_a_stall():
    h = health()
    h.after_batch(BatchOutcome(transient_error="t"))
    h.after_batch(BatchOutcome(transient_error="t", producer_error="fenced"))
    assert (h.publisher.broken, h.publisher.broken_cause) == ("fenced", "producer")


def test_a_batch_timed_out_while_the_broker_refuses_the_client_is_not_transient():
    h = health()
    h.publisher.refusal = "_AUTHENTICATION: SASL authentication error: Authentication failed"
    h.publisher.refusal_at = time.monotonic()
    outcome = BatchOutcome(transient_error="_MSG_TIMED_OUT: Local: Message timed out")
    h.after_batch(outcome)
    assert outcome.systemic_error == ("the broker refuses the connection: "
                                      "_AUTHENTICATION: SASL authentication error: Authentication failed")


def test_an_old_refusal_does_not_make_a_later_outage_systemic():
    # A TLS error while a certificate rotated, 40 s ago: a broker outage now is transient.
    h = health()
    h.publisher.refusal, h.publisher.refusal_at = "_SSL: certificate verify failed", time.monotonic() - 40
    outcome = BatchOutcome(transient_error="_MSG_TIMED_OUT")
    h.after_batch(outcome)
    assert outcome.systemic_error is None


def test_a_broker_watch_that_answers_forgets_the_refusal():
    h = health(cluster_ids=["A"])
    h.publisher.refusal, h.publisher.refusal_at = "_SSL: certificate verify failed", time.monotonic()
    asyncio.run(h.watch_once())
    assert h.publisher.refusal is None


def test_a_delivery_forgets_the_refusal_and_a_timeout_without_one_stays_transient():
    h = health()
    h.publisher.refusal = "_SSL: certificate verify failed"
    h.publisher.refusal_at = time.monotonic()
    h.after_batch(BatchOutcome(delivered=[1]))
    assert h.publisher.refusal is None
    outcome = BatchOutcome(transient_error="_MSG_TIMED_OUT")
    h.after_batch(outcome)
    assert outcome.systemic_error is None


def test_recreate_logs_the_cause_with_the_failures_errorid(caplog):
    h = health()
    h.publisher.mark_broken("fenced", "producer")
    h.kafka_stalls = 1
    before = value(metrics.PRODUCER_RECREATED.labels("producer"))
    asyncio.run(h.recreate("err-9"))
    assert h.publisher.recreated == 1 and h.kafka_stalls == 0
    assert value(metrics.PRODUCER_RECREATED.labels("producer")) == before + 1
    line = caplog.records[-1]
    assert (line.event, line.reason, line.cause, line.errorId) == ("producer recreated", "fenced", "producer", "err-9")


def test_the_broker_watch_recreates_the_producer_for_a_different_cluster(caplog):
    caplog.set_level(logging.WARNING, "kaireon_pub.worker")
    h = health(cluster_ids=["A", "A", RuntimeError("unreachable"), None, "B"])
    for _ in range(2):
        assert asyncio.run(h.watch_once()) == BROKER_WATCH_INTERVAL_S
    assert h.cluster_id == "A" and value(metrics.BROKER_UP) == 1
    asyncio.run(h.watch_once())
    assert value(metrics.BROKER_UP) == 0 and h.cluster_id == "A"
    asyncio.run(h.watch_once())
    assert h.publisher.broken is None
    asyncio.run(h.watch_once())
    assert h.cluster_id == "B" and h.publisher.broken_cause == "cluster_changed"
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "cluster changed"]
    assert (line.previousClusterId, line.clusterId) == ("A", "B") and line.errorId
