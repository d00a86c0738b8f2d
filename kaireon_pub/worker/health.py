"""The producer's health: when the worker must start a new producer.

- A producer whose batches keep timing out while nothing is delivered may be wedged on a broker
  that came back without its idempotence state: two such batches in a row and it is recreated.
- A batch that reports a producer-level error (fenced, a fatal error, the client raised) marks it.
- A batch that timed out while the broker refuses the client (SASL credentials, a TLS
  certificate: librdkafka's error callback) fails its tick as non-transient, with the reason.
- The broker watch: the cluster id behind the bootstrap address, every few seconds; a different
  cluster (a broker replaced, a disaster-recovery switch) gets a new producer, and whatever was in
  flight is treated as unconfirmed and published again.
The next tick recreates a marked producer before it claims.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kaireon_pub import metrics
from kaireon_pub.errors import new_error_id
from kaireon_pub.worker.kafka.outcome import BatchOutcome
from kaireon_pub.worker.kafka.publisher import Publisher

log = logging.getLogger("kaireon_pub.worker")

BROKER_WATCH_INTERVAL_S = 5.0
BROKER_WATCH_TIMEOUT_S = 3.0
STALLS_TO_RECREATE = 2
RECONNECT_BACKOFF_MAX_MS = 10_000  # librdkafka's default reconnect.backoff.max.ms


class ProducerHealth:
    def __init__(self, slot: int):
        self.slot = slot  # worker 0 reports kaireon_outbox_broker_up for the replica
        self.publisher: Publisher | None = None  # made at boot, after fork
        self.kafka_stalls = 0
        self.cluster_id: str | None = None

    def after_batch(self, outcome: BatchOutcome) -> None:
        if outcome.delivered:
            self.publisher.refusal = None  # the connection works (again)
        elif outcome.transient_error and self.refused_lately():
            # Timed out because the broker refuses our credentials or certificate: no retry mends
            # that, so the tick is non-transient (the streak, exit 3) and names the broker's reason.
            outcome.systemic_error = f"the broker refuses the connection: {self.publisher.refusal}"
        # A producer whose batches keep timing out while nothing is delivered may be wedged on
        # a broker that came back without its idempotence state: start afresh after two.
        self.kafka_stalls = self.kafka_stalls + 1 if outcome.transient_error and not outcome.delivered else 0
        if self.kafka_stalls >= STALLS_TO_RECREATE and not outcome.producer_error:
            self.kafka_stalls = 0
            self.publisher.mark_broken(f"two batches in a row undelivered: {outcome.transient_error}", "stalled")
        if outcome.producer_error and not self.publisher.broken:
            self.publisher.mark_broken(outcome.producer_error, "producer")

    def refused_lately(self) -> bool:
        """A refusal seen within the last batch's time: librdkafka tries again at least every
        reconnect.backoff.max.ms, so a broker that still refuses us says so within that and the
        batch's message.timeout.ms. An older one (a TLS error while a certificate rotated, a
        broker restarting) must not turn a later outage into exit 3."""
        publisher = self.publisher
        if not publisher.refusal:
            return False
        window = (publisher.settings.message_timeout_ms + RECONNECT_BACKOFF_MAX_MS) / 1000
        return time.monotonic() - publisher.refusal_at <= window

    async def recreate(self, error_id: str | None) -> None:
        reason, cause = self.publisher.broken, self.publisher.broken_cause or "producer"
        metrics.PRODUCER_RECREATED.labels(cause).inc()
        log.warning(f"producer recreated: {reason}", extra={
            "event": "producer recreated", "reason": reason, "cause": cause,
            "errorId": error_id or new_error_id()})
        self.kafka_stalls = 0
        await self.publisher.recreate()

    async def watch_once(self) -> float:
        """One look at the cluster id behind the bootstrap address; the pause before the next."""
        try:
            cluster_id = await asyncio.to_thread(self.publisher.fetch_cluster_id, BROKER_WATCH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - an unreachable broker is reported by librdkafka's lines
            cluster_id = None
            if self.slot == 0:
                metrics.BROKER_UP.set(0)
        else:
            self.publisher.refusal = None  # the broker answered this worker's credentials just now
            if self.slot == 0:
                metrics.BROKER_UP.set(1)
        if cluster_id:
            self.cluster_seen(cluster_id)
        return BROKER_WATCH_INTERVAL_S

    def cluster_seen(self, cluster_id: str) -> None:
        if self.cluster_id is not None and cluster_id != self.cluster_id:
            log.warning("the broker's cluster id changed; recreating the producer", extra={
                "event": "cluster changed", "previousClusterId": self.cluster_id,
                "clusterId": cluster_id, "errorId": new_error_id()})
            self.publisher.mark_broken(f"cluster id changed from {self.cluster_id} to {cluster_id}",
                                       "cluster_changed")
        self.cluster_id = cluster_id
