"""Producing one claimed batch with confluent-kafka, and sorting every event's fate.

Each event ends the batch in exactly one bucket:
- delivered: the broker acknowledged it (mark published);
- rejected: a per-event permanent error, e.g. too large for the broker (mark failed now);
- retry: a per-event error of unknown kind (attempts + 1, exponential back-off);
- released: not the event's fault (broker down, timeout, fatal producer error, drain deadline,
  or held back behind a rejected event of the same key): back to pending, attempts untouched.
The batch also reports the worst systemic condition seen, which decides the tick's fate.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from kaireon_pub import metrics
from kaireon_pub.errors import ConfigError
from kaireon_pub.logs import librdkafka_logger
from kaireon_pub.settings import Settings, kafka_env_name

log = logging.getLogger("kaireon_pub.worker.publisher")

# Errors that are the event's own fault: publishing it again cannot succeed.
PER_EVENT_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.INVALID_RECORD,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.POLICY_VIOLATION,
    KafkaError._INVALID_ARG,
    KafkaError.TOPIC_EXCEPTION,  # an invalid topic name: the event's own fault
}
# Errors of the whole tier's setup: retrying changes nothing until an operator acts.
SYSTEMIC = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._AUTHENTICATION,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._SSL,
}
# Errors that only say the broker was not there or not fast enough.
TRANSIENT = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError._QUEUE_FULL,
}


class ProducerFatal(Exception):
    """librdkafka raised a fatal error (e.g. UNKNOWN_PRODUCER_ID after a broker restart)."""


@dataclass
class BatchOutcome:
    delivered: list[int] = field(default_factory=list)
    ages: list[float] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    retry: dict[int, str] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)
    transient_error: str | None = None
    systemic_error: str | None = None
    fatal_error: str | None = None


def describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


def classify(err: KafkaError) -> str:
    """'fatal', 'permanent', 'systemic', 'transient' or 'retry' for a per-message error."""
    if err.fatal():
        return "fatal"
    code = err.code()
    if code in PER_EVENT_PERMANENT:
        return "permanent"
    if code in SYSTEMIC:
        return "systemic"
    if code in TRANSIENT or err.retriable():
        return "transient"
    return "retry"


class Publisher:
    """Owns one librdkafka producer; recreated after a fatal error."""

    def __init__(self, settings: Settings, client_id: str):
        self.settings = settings
        self.client_id = client_id
        self.fatal: KafkaError | None = None
        self.producer = self._make()

    def _make(self) -> Producer:
        config: dict[str, Any] = dict(self.settings.producer_config)
        config.setdefault("client.id", self.client_id)
        config["error_cb"] = self._on_error
        config["logger"] = librdkafka_logger()
        self.fatal = None
        try:
            return Producer(config)
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            match = re.search(r'property: "([a-z0-9._]+)"', str(exc)) or re.search(r'"([a-z0-9._]+)"', str(exc))
            if err is not None and err.code() == KafkaError._INVALID_ARG and match:
                prop = match.group(1)
                raise ConfigError(kafka_env_name(prop), err.str(),
                                  "a librdkafka producer property and value") from None
            raise

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = err
        # librdkafka's own log line already reports each connection failure; only the fatal and
        # the all-brokers-down conditions deserve a line of ours above DEBUG.
        if err.fatal():
            level = logging.ERROR
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            level = logging.WARNING
        else:
            level = logging.DEBUG
        log.log(level, f"librdkafka error: {describe(err)}",
                extra={"event": "kafka error", "kafkaError": err.name(), "fatal": err.fatal()})

    def recreate(self) -> None:
        old = self.producer
        try:
            old.purge()
            old.flush(0)
        except KafkaException:
            pass
        self.producer = self._make()

    async def publish(self, rows: list[tuple], strict: bool, deadline: float,
                      stop_deadline: Callable[[], float]) -> BatchOutcome:
        """Produce rows (already in per-key order), wait for every delivery report.

        `deadline` (monotonic) bounds the wait; `stop_deadline()` returns the drain deadline once
        a stop was requested, so a drain shortens the wait. Undelivered events are purged and
        released, never left unaccounted.
        """
        out = BatchOutcome()
        producer = self.producer
        pending: dict[int, tuple] = {}
        held_keys: set[str] = set()

        def on_delivery(err: KafkaError | None, msg: Any, event_id: int, created: float) -> None:
            pending.pop(event_id, None)
            if err is None:
                out.delivered.append(event_id)
                out.ages.append(time.time() - created)
                return
            kind = classify(err)
            text = describe(err)
            if kind == "permanent":
                out.rejected[event_id] = text
            elif kind == "retry":
                out.retry[event_id] = text
            else:
                out.released.append(event_id)
                if kind == "fatal":
                    out.fatal_error = text
                elif kind == "systemic":
                    out.systemic_error = text
                else:
                    out.transient_error = out.transient_error or text

        try:
            for row in rows:
                event_id, topic, key, payload, headers_text, event_type, _attempts, _shard, _xid, created, created_iso = row
                if key is not None and key in held_keys:
                    # Strict order: an earlier event of this key was rejected in this batch.
                    out.released.append(event_id)
                    continue
                headers = [("event-id", str(event_id).encode())]
                if event_type:
                    headers.append(("event-type", event_type.encode()))
                headers.append(("created-at", created_iso.encode()))
                if headers_text != "{}":
                    for name, value in orjson.loads(headers_text).items():
                        headers.append((name, str(value).encode()))
                pending[event_id] = row
                while True:
                    try:
                        producer.produce(
                            topic,
                            value=payload.encode(),
                            key=key.encode() if key is not None else None,
                            headers=headers,
                            on_delivery=partial(on_delivery, event_id=event_id, created=created),
                        )
                        break
                    except BufferError:
                        # Local queue full: let deliveries drain, then try again.
                        producer.poll(0.05)
                    except KafkaException as exc:
                        err = exc.args[0]
                        pending.pop(event_id, None)
                        kind = classify(err)
                        if kind == "permanent":
                            out.rejected[event_id] = describe(err)
                            if strict and key is not None:
                                held_keys.add(key)
                        elif kind == "fatal":
                            out.fatal_error = describe(err)
                            out.released.append(event_id)
                        elif kind == "systemic":
                            out.systemic_error = describe(err)
                            out.released.append(event_id)
                        else:
                            out.transient_error = describe(err)
                            out.released.append(event_id)
                        break
                if out.fatal_error:
                    break
            producer.poll(0)

            # Wait for the reports in slices of at most a second, so a stop is handled promptly.
            while pending and not out.fatal_error and self.fatal is None:
                now = time.monotonic()
                limit = min(deadline, stop_deadline())
                if now >= limit:
                    break
                # Inline, not in a thread: nothing else in this loop needs to run meanwhile, and
                # a slice of at most a second keeps the stop signal prompt.
                producer.flush(min(1.0, limit - now))
        except KafkaException as exc:
            # poll()/flush() raise once the producer is in a fatal state.
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if err is not None and err.fatal():
                out.fatal_error = describe(err)
            else:
                out.transient_error = str(exc)
        if self.fatal is not None and not out.fatal_error:
            out.fatal_error = describe(self.fatal)
        if pending:
            # Drain deadline or fatal error: purge what is left; its reports arrive now.
            try:
                producer.purge()
                producer.poll(0)
            except KafkaException:
                pass
            for event_id in list(pending):
                out.released.append(event_id)
            pending.clear()
            if not out.fatal_error and not out.transient_error:
                out.transient_error = "delivery not confirmed before the deadline"
        # Rows not produced at all because the loop stopped at a fatal error.
        if out.fatal_error:
            settled = set(out.delivered) | set(out.rejected) | set(out.retry) | set(out.released)
            out.released.extend(r[0] for r in rows if r[0] not in settled)
        metrics.PRODUCER_QUEUE_DEPTH.set(len(producer))
        return out
