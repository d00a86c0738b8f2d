"""One claimed batch produced with confluent-kafka: the per-row loop, and every event's fate
(outcome.py names the buckets). The loop is the tier's hottest code: moved here whole from
worker/publisher.py; change it only with a measurement before and after (bench/RESULTS.md).

Strict order across topics. librdkafka keeps the order of one partition only; a key's events on two
topics do not share one. So, in strict mode, a batch goes to librdkafka in waves: a wave hands a
key's events over while they go to the topic of its first event in the wave; the key's first event
on another topic, and every later one of the key, wait. When everything handed is reported, the
next wave takes the waiting events of keys whose handed events were all delivered; a key with one
that was not keeps the rest back: released (pending, attempts untouched, not counted unconfirmed)
for the next claim, which holds the key behind the retry. A wave that ends at the deadline or with
an error that ends the batch releases them the same way. Relaxed mode hands everything over in one
wave and counts an event that retries while later events of its key went out
(kaireon_outbox_order_violations_total). Order per topic, counted, would cost nothing; it was not
chosen because strict mode promises that a later event waits for an earlier one that fails. Cost
(bench/RESULTS.md, "Strict order across topics"): none in the loop beyond the noise; one broker
round trip per change of topic of a key within a batch.

A record too large for its topic: the broker refuses the whole record batch, and librdkafka reports
MSG_SIZE_TOO_LARGE for each record in it (errors.py: BATCH_REFUSALS). A record reported so while
alone in its wave is rejected; records that shared their wave are size suspects, released and
remembered here, and in its next publish each is handed over alone (`_cut_at_suspect`), for the
broker to judge it alone. The tier cannot size records against max.message.bytes: the broker judges
the batch as compressed. Suspects cost a round trip each; the loop is untouched (bench/RESULTS.md).

Producer-level failures are not the events' fault (a fenced producer, an out-of-order sequence or
unknown producer id, any fatal error, an exception from the client): the batch is released and
`Publisher.broken` tells the worker to recreate the producer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException

from kaireon_pub import metrics
from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka.delivery import Batch
from kaireon_pub.worker.kafka.errors import classify, describe
from kaireon_pub.worker.kafka.outcome import BatchOutcome
from kaireon_pub.worker.kafka.producer import ServedProducer
from kaireon_pub.worker.kafka.records import PoisonRow, check_topic, record_headers, record_key
from kaireon_pub.worker.rows import Row

if TYPE_CHECKING:
    from kaireon_pub.worker.kafka.tracing import Tracing

WAIT_SLICE_S = 0.5  # how often a waiting batch looks again at its deadline
SUSPECTS_KEPT = 10_000  # event ids whose produce() raised once (forgotten beyond this)
SIZE_SUSPECTS_KEPT = 10_000  # event ids refused with a record batch they shared (forgotten beyond this)


class Publisher(ServedProducer):
    """Owns one librdkafka producer and the thread that serves it; recreated when broken."""

    def __init__(self, settings: Settings, client_id: str, tracing: Tracing | None = None):
        self.tracing = tracing  # kafka/tracing.py: spans per batch and per event; None when off
        # Event ids whose produce() raised something unexpected once: a second time, the row is
        # taken to be the cause (it retries alone) instead of recreating the producer for ever. Kept
        # across a recreate: the first raise is what recreates the producer, so the second one always
        # meets a new producer.
        self._suspects: set[int] = set()
        # Size suspects (outcome.py): event ids the broker refused with a record batch they shared, as
        # too large. Each is handed over alone in its next publish, for the broker to judge it alone.
        # Kept across a recreate; forgotten beyond SIZE_SUSPECTS_KEPT, or in another worker process
        # (there it may share a refused batch once more, and become a suspect there).
        self._size_suspects: set[int] = set()
        self._legal_topics: set[str] = set()
        super().__init__(settings, client_id)

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
        batch = Batch(asyncio.get_running_loop())
        if self.tracing is not None:
            batch.trace = self.tracing.batch(rows, self.client_id)
        trace = batch.trace
        out = batch.out
        producer = self.producer
        produce = producer.produce
        report = batch.report
        source = self.settings.cloudevents_source if self.settings.cloudevents else None
        legal_topics = self._legal_topics
        size_suspects = self._size_suspects
        held_keys: set[str] = set()
        unhanded: set[int] = set()  # rows not handed to librdkafka: refused, held back or not tried
        # Strict order across topics (module docstring): the topic of each key's first event in this
        # wave; the keys that wait for the next wave, and their events, in order.
        key_topics: dict[str, str] | None = {} if strict else None
        waiting_keys: set[str] = set()
        later: list[Row] = []
        wave = rows
        self._open.add(batch)
        try:
            while True:
                if cut_off() <= time.monotonic():
                    # The lease (or the drain) ended before this wave was handed over (a claim that
                    # took that long): the shards' next owner may publish these rows already.
                    unhanded.update(r.id for r in wave)
                    out.transient_error = out.transient_error or "the lease ended before the batch was handed over"
                    break
                rest: list[Row] = []
                if size_suspects:
                    wave, rest = self._cut_at_suspect(wave)
                remaining = iter(wave)
                for row in remaining:
                    if self.broken or out.producer_error:
                        unhanded.add(row.id)
                        break
                    if held_keys and row.key in held_keys:
                        unhanded.add(row.id)
                        continue  # strict order: an earlier event of this key failed in this batch
                    if waiting_keys and row.key in waiting_keys:
                        later.append(row)
                        continue
                    topic = row.topic
                    if (key_topics is not None and row.key is not None
                            and key_topics.setdefault(row.key, topic) != topic):
                        # An earlier event of this key went to another topic and is not confirmed yet:
                        # this one and the rest of its key wait for the next wave.
                        waiting_keys.add(row.key)
                        later.append(row)
                        continue
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
                            # payload None: a tombstone
                            produce(topic, row.payload, key, headers=headers, on_delivery=on_delivery)
                            continue
                        except BufferError:
                            handed = await self._produce_when_room(
                                out, row,
                                partial(produce, topic, row.payload, key, headers=headers, on_delivery=on_delivery),
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
                later.extend(rest)
                batch.produced(len(rows) - len(unhanded) - len(later))
                while not batch.done.done() and not self.broken:
                    remaining_s = min(deadline, cut_off()) - time.monotonic()
                    if remaining_s <= 0:
                        break
                    await asyncio.wait((batch.done,), timeout=min(remaining_s, WAIT_SLICE_S))
                if not later:
                    break
                wave = self._next_wave(batch, rows, later, unhanded, held_keys, strict)
                later = []
                if not wave:
                    break
                key_topics = {} if strict else None
                waiting_keys = set()
        finally:
            self._open.discard(batch)
            unconfirmed = batch.close()
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
        batch.release(rows, unhanded)
        if out.suspects:
            if len(size_suspects) + len(out.suspects) > SIZE_SUSPECTS_KEPT:
                size_suspects.clear()
            size_suspects.update(out.suspects)
        metrics.PRODUCER_QUEUE_DEPTH.set(len(producer))
        if trace is not None:
            trace.end(out)
        return out

    def _next_wave(self, batch: Batch, rows: list[Row], later: list[Row], unhanded: set[int],
                   held_keys: set[str], strict: bool) -> list[Row]:
        """The events a wave left for the next one, once every record handed so far is reported: those
        of keys whose handed events were all delivered (in relaxed order, all of them). A key with one
        that was not holds the rest of it (released with the batch), as do all of them when the wait
        ended without every report, or with an error that ends the batch."""
        out = batch.out
        if not batch.done.done() or self.broken or out.producer_error or out.systemic_error or out.transient_error:
            unhanded.update(r.id for r in later)
            return []
        if strict:
            waiting = {r.key for r in later if r.key is not None}
            waiting_ids = {r.id for r in later}
            delivered = set(out.delivered)
            for r in rows:
                if r.key in waiting and r.id not in delivered and r.id not in unhanded and r.id not in waiting_ids:
                    held_keys.add(r.key)  # handed and not delivered: its key waits for the next claim
        wave = [r for r in later if r.key not in held_keys]
        unhanded.update(r.id for r in later if r.key in held_keys)
        if wave:
            batch.more()
        return wave

    def _cut_at_suspect(self, wave: list[Row]) -> tuple[list[Row], list[Row]]:
        """(this wave, the rows left for the next): a size suspect is handed over alone, in a wave of its
        own, for the broker to judge it alone (its record batch then holds it only). The wave ends
        before the first suspect, or, when the wave begins with one, right after it (it is then no
        longer a suspect: refused alone, it is rejected)."""
        suspects = self._size_suspects
        for i, row in enumerate(wave):
            if row.id in suspects:
                if i:
                    return wave[:i], wave[i:]
                suspects.discard(row.id)
                return wave[:1], wave[1:]
        return wave, []

    def _check_topic(self, topic: str) -> None:
        """PoisonRow for a name Kafka refuses; a legal one is remembered (a handful per tier)."""
        check_topic(topic, self._legal_topics)

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
            out.retry[row.id] = text  # it stays a suspect: each attempt of it retries alone
        else:
            if len(self._suspects) >= SUSPECTS_KEPT:
                self._suspects.clear()
            self._suspects.add(row.id)
            out.producer_error = text
            self.mark_broken(text, "exception")
