"""Producing one claimed batch with confluent-kafka, and sorting every event's fate.

Each event ends the batch in exactly one bucket:
- delivered: the broker acknowledged it (mark published);
- rejected: the event's own permanent fault, e.g. too large for the broker, headers (or
  binary_headers) that are not a JSON object, a binary header value that is not base64, an
  invalid topic name (mark failed now);
- retry: a per-event error of unknown kind (attempts + 1, exponential back-off);
- released: not the event's fault (broker down, timeout, a producer that must be recreated, the
  drain or lease deadline, or held back behind a rejected event of the same key): back to
  pending, attempts untouched.

A delivery thread serves librdkafka (`poll`) all the time, busy or idle. Delivery reports resolve
the batch on the event loop, so the worker's other tasks (the lease keeper, the broker watch)
run while a batch waits for the broker, and librdkafka's log and error callbacks are delivered
within a fraction of a second even when no batch is in flight.

Producer-level failures are not the events' fault: a fenced producer, an out-of-order sequence or
unknown producer id (a broker that lost its idempotence state), any fatal error, an unexpected
exception from the client. The batch is released and `Publisher.broken` tells the worker to
recreate the producer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from kaireon_pub import metrics
from kaireon_pub.settings import Settings
from kaireon_pub.worker.producer import make_producer
from kaireon_pub.worker.rows import Row

if TYPE_CHECKING:
    from kaireon_pub.worker.tracing import BatchTrace, Tracing

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
    KafkaError._SSL,
}
# A topic that does not exist (and that the broker does not create) is not for the whole tier to
# stop on: other topics publish, the events of that topic retry with back-off, holding their keys
# only, and become failed after OUTBOX_MAX_ATTEMPTS (requeue them once the topic exists).
PER_EVENT_RETRY = {
    KafkaError._UNKNOWN_TOPIC,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
}
# Kafka's rule for topic names; librdkafka refuses others only after a metadata round trip, and
# then with an error (_UNKNOWN_TOPIC) that does not say the name is the problem.
LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")
# The producer's own state is wrong (its epoch, its sequence numbers, its id): only a new producer
# gets out of it. Seen when in-flight messages outlive message.timeout.ms (the broker then fences
# the producer on every partition) and when a broker comes back without its idempotence state.
PRODUCER_LEVEL = {
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.INVALID_PRODUCER_ID_MAPPING,
    KafkaError.INVALID_TXN_STATE,
    KafkaError._FENCED,
    KafkaError._FATAL,
    KafkaError._GAPLESS_GUARANTEE,
    KafkaError._INCONSISTENT,
    KafkaError._STATE,
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

LEGAL_TOPICS_KEPT = 10_000  # topic names already found legal, each checked once (forgotten beyond this)
POLL_SLICE_S = 0.1  # the delivery thread's poll timeout: how late a stop of the thread may be
WAIT_SLICE_S = 0.5  # how often a waiting batch looks again at its deadline


class PoisonRow(Exception):
    """The row itself cannot become a Kafka record (its headers, its key, its payload)."""


@dataclass
class BatchOutcome:
    delivered: list[int] = field(default_factory=list)
    ages: list[float] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    retry: dict[int, str] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)
    # Released rows that had been handed to librdkafka: the broker may have them already, so a
    # later publish of these may be a duplicate (counted in kaireon_outbox_unconfirmed_total).
    unconfirmed: int = 0
    transient_error: str | None = None
    systemic_error: str | None = None
    producer_error: str | None = None


def describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


def classify(err: KafkaError) -> str:
    """'producer', 'permanent', 'systemic', 'transient' or 'retry' for a per-message error."""
    code = err.code()
    if err.fatal() or code in PRODUCER_LEVEL:
        return "producer"
    if code in PER_EVENT_PERMANENT:
        return "permanent"
    if code in PER_EVENT_RETRY:
        return "retry"
    if code in SYSTEMIC:
        return "systemic"
    if code in TRANSIENT or err.retriable():
        return "transient"
    return "retry"


def _load_json(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # integers beyond 64 bits, which orjson refuses


def _json_text(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _is_json(value: bytes) -> bool:
    try:
        _load_json(value)
    except ValueError:  # orjson's and json's decode errors, and bytes that are not UTF-8
        return False
    return True


def _json_object(text: str, column: str) -> dict[str, Any]:
    """A header column's JSON object; PoisonRow when it is not valid JSON or not an object."""
    if text == "{}":
        return {}
    try:
        value = _load_json(text)
    except ValueError as exc:
        raise PoisonRow(f"{column} are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PoisonRow(f"{column} must be a JSON object, found a JSON {type(value).__name__}")
    return value


def _own_headers(row: Row) -> list[tuple[str, bytes]]:
    """The event's own headers: str values as UTF-8, bytes values exactly.

    A non-string JSON value (written by plain SQL, or before str-only headers were enforced) is
    sent as its compact JSON text. Raises PoisonRow when either header column is not a JSON object.
    """
    headers: list[tuple[str, bytes]] = []
    for name, value in _json_object(row.headers, "headers").items():
        headers.append((name, value.encode() if isinstance(value, str) else _json_text(value)))
    for name, value in _json_object(row.binary_headers, "binary_headers").items():
        try:
            headers.append((name, base64.b64decode(value, validate=True)))
        except (TypeError, ValueError):
            raise PoisonRow(f"binary header {name!r} is not base64 text") from None
    return headers


def record_headers(row: Row, cloudevents_source: str | None = None) -> list[tuple[str, bytes]]:
    """The record's headers: event-id, event-type, created-at, the CloudEvents attributes when
    `cloudevents_source` is given, then the event's own headers.

    CloudEvents binary content mode (the Kafka protocol binding): ce_specversion 1.0, ce_id (the
    event id), ce_source, ce_type (the event type, else the topic), ce_time (created-at) and, when
    the record has a value, content-type (application/json when the value is JSON, else
    application/octet-stream). An attribute the event carries itself as a header (any case) is
    left to it: that is how an application sets its content-type, say application/avro.
    """
    event_id = b"%d" % row.id
    created_at = row.created_iso.encode()
    if row.event_type:
        headers = [("event-id", event_id), ("event-type", row.event_type.encode()), ("created-at", created_at)]
    else:
        headers = [("event-id", event_id), ("created-at", created_at)]
    if cloudevents_source is None and row.headers == "{}" and row.binary_headers == "{}":
        return headers  # most events: no header of their own, nothing to parse
    own = _own_headers(row)
    if cloudevents_source is not None:
        given = {name.lower() for name, _ in own}
        attributes = [
            ("ce_specversion", b"1.0"),
            ("ce_id", event_id),
            ("ce_source", cloudevents_source.encode()),
            ("ce_type", (row.event_type or row.topic).encode()),
            ("ce_time", created_at),
        ]
        if row.payload is not None:
            kind = "application/json" if _is_json(row.payload) else "application/octet-stream"
            attributes.append(("content-type", kind.encode()))
        headers += [(name, value) for name, value in attributes if name not in given]
    return headers + own


def record_key(row: Row) -> bytes | None:
    """The record's key: the exact bytes the application gave, or the key's UTF-8."""
    if row.key_bytes is not None:
        return bytes(row.key_bytes)
    return row.key.encode() if row.key is not None else None


class _Batch:
    """One batch's delivery reports, filled by the delivery thread, read by the event loop.

    The event loop hands records to librdkafka without taking the lock; it counts them once the
    batch is produced (`handed`, set with `produced_all`). The delivery thread counts the reports
    (`reported`): the batch is complete when both counts meet."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.lock = threading.Lock()
        self.handed = 0  # records handed to librdkafka; set with produced_all
        self.reported = 0  # delivery reports taken in
        self.out = BatchOutcome()
        self.produced_all = False
        self.closed = False
        self.trace: BatchTrace | None = None  # the batch's spans, when tracing is on

    def report(self, event_id: int, created: float, err: KafkaError | None, msg: Any) -> None:
        """librdkafka's delivery callback, bound to one event by partial(); runs on the delivery thread."""
        with self.lock:
            if self.closed:
                return  # a purged message of a batch that was already given up
            self.reported += 1
            out = self.out
            if err is None:
                out.delivered.append(event_id)
                out.ages.append(time.time() - created)
            else:
                kind = classify(err)
                text = describe(err)
                if kind == "permanent":
                    out.rejected[event_id] = text
                elif kind == "retry":
                    out.retry[event_id] = text
                elif kind == "producer":
                    out.producer_error = out.producer_error or text
                elif kind == "systemic":
                    out.systemic_error = text
                else:
                    out.transient_error = out.transient_error or text
            if self.trace is not None:
                self.trace.reported(event_id, err, msg)
            finished = (self.produced_all and self.reported == self.handed) or out.producer_error is not None
        if finished:
            self.wake()

    def wake(self) -> None:
        """Thread-safe: end the batch's wait now."""
        self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Publisher:
    """Owns one librdkafka producer and the thread that serves it; recreated when broken."""

    def __init__(self, settings: Settings, client_id: str, tracing: Tracing | None = None):
        self.settings = settings
        self.client_id = client_id
        self.tracing = tracing  # worker/tracing.py: spans per batch and per event; None when off
        self.broken: str | None = None  # why the producer must be recreated, once it must
        self.broken_cause: str | None = None
        self._open: set[_Batch] = set()
        # Event ids whose produce() raised something unexpected once: a second time, the row is
        # taken to be the cause (it retries alone) instead of recreating the producer for ever.
        self._suspects: set[int] = set()
        self._legal_topics: set[str] = set()
        self._start()

    # ---- the producer and its delivery thread ------------------------------------------------

    def _start(self) -> None:
        self.broken = None
        self.broken_cause = None
        self.producer = make_producer(self.settings, self.client_id, self._on_error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(self.producer, self._stop),
                                        name=f"{self.client_id}-delivery", daemon=True)
        self._thread.start()

    def _serve(self, producer: Producer, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                producer.poll(POLL_SLICE_S)
            except Exception as exc:  # noqa: BLE001 - a client that raises here is recreated
                self.mark_broken(f"poll raised {type(exc).__name__}: {exc}", "exception")
                return

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's error callback (delivery thread)."""
        if err.fatal():
            level = logging.ERROR
            self.mark_broken(describe(err), "fatal")
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            level = logging.WARNING
        else:
            # librdkafka's own log line (kaireon_pub.librdkafka) already reports each connection
            # failure; ours would say it twice.
            level = logging.DEBUG
        log.log(level, f"librdkafka error: {describe(err)}",
                extra={"event": "kafka error", "kafkaError": err.name(), "fatal": err.fatal()})

    def mark_broken(self, reason: str, cause: str) -> None:
        """Thread-safe: the producer must be recreated; every waiting batch gives up now."""
        if self.broken is None:
            self.broken = reason
            self.broken_cause = cause
        for batch in list(self._open):
            batch.wake()

    async def recreate(self) -> None:
        """A new producer and delivery thread; the old ones are disposed of off the event loop."""
        old, stop, thread = self.producer, self._stop, self._thread
        stop.set()
        self._suspects.clear()
        self._start()
        await asyncio.to_thread(_dispose, old, thread)

    async def close(self) -> None:
        self._stop.set()
        await asyncio.to_thread(_dispose, self.producer, self._thread)

    def queue_depth(self) -> int:
        return len(self.producer)

    def fetch_cluster_id(self, timeout: float) -> str | None:
        """The cluster id the broker reports in a metadata response (blocking: call in a thread)."""
        return self.producer.list_topics(timeout=timeout).cluster_id

    # ---- one batch ---------------------------------------------------------------------------

    async def publish(self, rows: list[Row], strict: bool, deadline: float,
                      cut_off: Callable[[], float]) -> BatchOutcome:
        """Produce rows (already in per-key order) and await every delivery report.

        The wait ends at `deadline` (monotonic) or at `cut_off()` (the drain deadline and the
        lease's remaining life, re-read while waiting), whichever comes first. Whatever is not
        confirmed then is purged from librdkafka and released: nothing of an abandoned batch
        stays queued in the client.

        The loop over the rows is the tier's hottest code: one record per event, its work kept to
        what the record needs; whatever goes wrong leaves it for the methods below.
        """
        batch = _Batch(asyncio.get_running_loop())
        if self.tracing is not None:
            batch.trace = self.tracing.batch(rows, self.client_id)
        trace = batch.trace
        out = batch.out
        producer = self.producer
        produce = producer.produce
        report = batch.report
        source = self.settings.cloudevents_source if self.settings.cloudevents else None
        legal_topics = self._legal_topics
        held_keys: set[str] = set()
        unhanded: set[int] = set()  # rows not handed to librdkafka: refused, held back or not tried
        self._open.add(batch)
        try:
            remaining = iter(rows)
            for row in remaining:
                if self.broken or out.producer_error:
                    unhanded.add(row.id)
                    break
                if held_keys and row.key in held_keys:
                    unhanded.add(row.id)
                    continue  # strict order: an earlier event of this key failed in this batch
                topic = row.topic
                try:
                    if topic not in legal_topics:
                        self._check_topic(topic)
                    headers = record_headers(row, source)
                    key = record_key(row)
                except PoisonRow as exc:
                    out.rejected[row.id] = str(exc)
                    handed = False
                except Exception as exc:  # noqa: BLE001 - whatever the row makes go wrong stays on the row
                    out.rejected[row.id] = f"cannot build the record: {type(exc).__name__}: {exc}"
                    handed = False
                else:
                    if trace is not None:
                        headers = trace.event(row, headers)  # the event's span; its traceparent on the record
                    on_delivery = partial(report, row.id, row.created_epoch)
                    try:
                        produce(topic, row.payload, key, headers=headers, on_delivery=on_delivery)  # payload None: a tombstone
                        continue
                    except BufferError:
                        handed = await self._produce_when_room(
                            out, row, partial(produce, topic, row.payload, key, headers=headers, on_delivery=on_delivery),
                            min(deadline, cut_off()))
                    except Exception as exc:  # noqa: BLE001 - classified in _refused
                        self._refused(out, row, exc)
                        handed = False
                if handed:
                    continue
                unhanded.add(row.id)
                if strict and row.key is not None and (row.id in out.rejected or row.id in out.retry):
                    held_keys.add(row.key)
                if out.producer_error or out.systemic_error or out.transient_error:
                    break
            unhanded.update(r.id for r in remaining)  # after a break: the rows never tried
            with batch.lock:
                batch.produced_all = True
                batch.handed = len(rows) - len(unhanded)
                finished = batch.reported == batch.handed
            if finished:
                batch._finish()
            while not batch.done.done() and not self.broken:
                remaining_s = min(deadline, cut_off()) - time.monotonic()
                if remaining_s <= 0:
                    break
                await asyncio.wait((batch.done,), timeout=min(remaining_s, WAIT_SLICE_S))
        finally:
            self._open.discard(batch)
            with batch.lock:
                batch.closed = True
                unconfirmed = batch.produced_all and batch.reported < batch.handed
        if unconfirmed:
            # The deadline, the drain, the lease or a broken producer: purge, so that nothing of
            # this batch can still be delivered behind the rows we release now.
            try:
                producer.purge(in_queue=True, in_flight=True, blocking=False)
            except Exception as exc:  # noqa: BLE001 - a client that cannot purge is recreated
                self.mark_broken(f"purge raised {type(exc).__name__}: {exc}", "exception")
            if not (out.producer_error or out.transient_error or self.broken):
                out.transient_error = "delivery not confirmed before the deadline"
        if self.broken and not out.producer_error:
            out.producer_error = self.broken
        if len(out.delivered) < len(rows):  # else every row is delivered: nothing released
            settled = set(out.delivered) | set(out.rejected) | set(out.retry)
            out.released = [r.id for r in rows if r.id not in settled]
            out.unconfirmed = sum(1 for event_id in out.released if event_id not in unhanded)
        metrics.PRODUCER_QUEUE_DEPTH.set(len(producer))
        if trace is not None:
            trace.end(out)
        return out

    def _check_topic(self, topic: str) -> None:
        """PoisonRow for a name Kafka refuses; a legal one is remembered (a handful per tier)."""
        if not LEGAL_TOPIC.fullmatch(topic) or topic in (".", ".."):
            raise PoisonRow(f"TOPIC_EXCEPTION: {topic!r} is not a valid Kafka topic name "
                            "(1 to 249 of a-z A-Z 0-9 . _ -, not '.' or '..')")
        if len(self._legal_topics) >= LEGAL_TOPICS_KEPT:
            self._legal_topics.clear()
        self._legal_topics.add(topic)

    async def _produce_when_room(self, out: BatchOutcome, row: Row, produce: Callable[[], None],
                                 limit: float) -> bool:
        """librdkafka's local queue is full: the delivery thread empties it; `produce()` the row again
        until `limit`. False when the row was not handed (its fate is then in `out`)."""
        while True:
            if time.monotonic() >= limit:
                out.transient_error = out.transient_error or "librdkafka's local queue stayed full"
                return False
            await asyncio.sleep(0.005)
            try:
                produce()
                return True
            except BufferError:
                continue
            except Exception as exc:  # noqa: BLE001 - classified in _refused
                self._refused(out, row, exc)
                return False

    def _refused(self, out: BatchOutcome, row: Row, exc: Exception) -> None:
        """produce() raised for this row: its fate, or the producer's."""
        if isinstance(exc, KafkaException):
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            kind = classify(err) if err is not None else "producer"
            text = describe(err) if err is not None else str(exc)
            if kind == "permanent":
                out.rejected[row.id] = text
            elif kind == "retry":
                out.retry[row.id] = text
            elif kind == "producer":
                out.producer_error = text
                self.mark_broken(text, "fatal" if err is not None and err.fatal() else "producer")
            elif kind == "systemic":
                out.systemic_error = text
            else:
                out.transient_error = text
            return
        # The client misbehaved, or the row is the cause.
        text = f"produce raised {type(exc).__name__}: {exc}"
        if row.id in self._suspects:
            out.retry[row.id] = text
        else:
            self._suspects.add(row.id)
            out.producer_error = text
            self.mark_broken(text, "exception")


def _dispose(producer: Producer, thread: threading.Thread) -> None:
    """Stop serving an old producer and let it go (runs in a worker thread: it may block)."""
    thread.join(POLL_SLICE_S * 20)
    try:
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.flush(0)
    except Exception:  # noqa: BLE001, S110 - a broken client is dropped whatever it says
        pass
