"""One batch's delivery reports, and its close-out: which events are released, and how many of
those librdkafka had already taken (unconfirmed: the broker may have them)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError

from kaireon_pub.worker.kafka.errors import BATCH_REFUSALS, classify, describe
from kaireon_pub.worker.kafka.outcome import BatchOutcome
from kaireon_pub.worker.rows import Row

if TYPE_CHECKING:
    from kaireon_pub.worker.kafka.spans import BatchTrace


class Batch:
    """One batch's delivery reports, filled by the delivery thread, read by the event loop.

    The event loop hands records to librdkafka without taking the lock; it counts them once the
    batch is produced (`handed`, set by `produced()`). The delivery thread counts the reports
    (`reported`): the batch is complete when both counts meet. Once `close()`d, a late report
    (a purged message) changes nothing.

    A record batch the broker refused whole (errors.py: BATCH_REFUSALS) is judged by wave: a record
    reported so while it was the only one its wave handed over is rejected; while it shared its wave,
    it is a suspect (`out.suspects`, released, never unconfirmed): the publisher hands it over alone
    next time. Judged when a next wave starts (`more()`) and at `close()`, once the wave's count is
    known."""

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
        self.wave_start = 0  # `handed` when the current wave began
        self.refused: dict[int, str] = {}  # this wave's records whose record batch was refused whole
        self.not_persisted: list[int] = []  # reported refused for their batch: the broker has none of them

    def report(self, event_id: int, created: float, err: KafkaError | None, msg: Any) -> None:
        """librdkafka's delivery callback, bound to one event by partial(); runs on the delivery thread."""
        kind = None
        with self.lock:
            if self.closed:
                return  # a purged message of a batch that was already given up
            self.reported += 1
            out = self.out
            if err is None:
                out.delivered.append(event_id)
                # Where it landed (outcome.py). confluent-kafka gives None for an offset librdkafka
                # reports as negative (OFFSET_INVALID -1001; -1 for a retry the broker recognised as
                # a duplicate, DUPLICATE_SEQUENCE_NUMBER): the mark stores NULL (settle.nullable_int_array).
                out.partitions.append(msg.partition())
                out.offsets.append(msg.offset())
                out.ages.append(time.time() - created)
            else:
                kind = classify(err)
                text = describe(err)
                if kind == "permanent" and err.code() in BATCH_REFUSALS:
                    self.refused[event_id] = text  # judged with its wave: its span ends with the batch
                    kind = "judged"
                elif kind == "permanent":
                    out.rejected[event_id] = text
                elif kind == "released":
                    self.not_persisted.append(event_id)
                elif kind == "retry":
                    out.retry[event_id] = text
                elif kind == "producer":
                    out.producer_error = out.producer_error or text
                elif kind == "systemic":
                    out.systemic_error = text
                else:
                    out.transient_error = out.transient_error or text
            if self.trace is not None and kind != "judged":
                self.trace.reported(event_id, err, msg)
            finished = (self.produced_all and self.reported == self.handed) or out.producer_error is not None
        if finished:
            self.wake()

    def produced(self, handed: int) -> None:
        """Every row is produced or given up: `handed` records went to librdkafka. Ends the
        batch's wait at once when their reports are all in already."""
        with self.lock:
            self.produced_all = True
            self.handed = handed
            finished = self.reported == self.handed
        if finished:
            self._finish()

    def more(self) -> None:
        """Every record handed so far is reported: more follow (a next wave, strict order across
        topics); the wait ends again at the next `produced()`'s count."""
        with self.lock:
            self._judge_wave()
            self.wave_start = self.handed
            self.produced_all = False
        self.done = self.loop.create_future()

    def close(self) -> bool:
        """No report counts any more; True when some handed record was not reported (unconfirmed:
        the caller purges them from librdkafka)."""
        with self.lock:
            self.closed = True
            self._judge_wave()
            return self.produced_all and self.reported < self.handed

    def _judge_wave(self) -> None:
        """Under the lock: the wave's records reported with their record batch refused whole. Alone in
        the wave, the record was alone in its record batch: its own fault. Else a suspect."""
        if not self.refused:
            return
        out = self.out
        if self.produced_all and self.handed - self.wave_start == 1:
            out.rejected.update(self.refused)
        else:
            out.suspects.extend(self.refused)
            self.not_persisted.extend(self.refused)
        self.refused.clear()

    def release(self, rows: list[Row], unhanded: set[int]) -> None:
        """Once closed: every row neither delivered, rejected nor retried is released; those that
        were handed to librdkafka (not in `unhanded`) are counted unconfirmed, unless the broker
        refused their record batch."""
        out = self.out
        if len(out.delivered) < len(rows):  # else every row is delivered: nothing released
            settled = set(out.delivered) | set(out.rejected) | set(out.retry)
            out.released = [r.id for r in rows if r.id not in settled]
            not_sent = unhanded.union(self.not_persisted) if self.not_persisted else unhanded
            out.unconfirmed = sum(1 for event_id in out.released if event_id not in not_sent)

    def wake(self) -> None:
        """Thread-safe: end the batch's wait now."""
        self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
