"""The dead-letter sweep (OUTBOX_DEAD_LETTER_TOPIC, off when empty): every `failed` event of the
worker's own shards gets one record on the dead-letter topic, and its row `dead_lettered_at`.

Not in the publish path: a batch settles as it always did (a failed row is failed whatever the
dead-letter topic does); a side task of each worker walks its own leased shards for failed rows with
no dead-letter record yet (db/deadletter.sql: batches, oldest failure first, on a keyset cursor),
produces one record each with the worker's producer, waits for the reports, and marks the
acknowledged rows only (fenced: still failed, not yet dead-lettered). A record not acknowledged
(refused, timed out, purged, the producer recreated) leaves its row as it was and the walk goes on
past it; the next walk produces it again (logged `dead letter failed` with an errorId, counted in
kaireon_outbox_dead_letter_errors_total, in kaireon_outbox_dead_letter_waiting until acknowledged or
a whole full walk no longer finds it refused). One refused for its size is produced again alone, then
without its value (produce()); refused even so (its key and headers too large), it waits and blocks
no other. Nothing is lost; what can be duplicated: a crash (or a lost mark) between the
acknowledgement and the mark produces the record again, uncounted (`kaireon-dlq-event-id` tells them
apart), and two workers walking one shard across a handover both produce it; the second mark finds
the row marked and counts it in kaireon_outbox_dead_letter_unmarked_total (so does a row requeued or
purged between produce and mark).

When: a full walk (every failed row of the shards not yet dead-lettered) at the worker's start, when
its shards change, every FULL_S, RETRY_S after a walk with an error, its batches back to back; a
recent walk (the rows failed in the last LOOKBACK_S: a range of the failed rows' index, whatever
number of them is kept) within WATCH_S after this worker's settle turned rows `failed` (the `failed`
count of kaireon_outbox_processed_total grew: no hook in the settle step). A full walk passes over
the failed rows already dead-lettered: 100,000 cost 20-80 ms (db/deadletter.sql), every FULL_S;
failed rows are kept until requeued or deleted, so the prompt path does not walk them (0.4 ms).

The worker's producer, not one of its own: the same connections, credentials and idempotence, no
second client per worker. The cost: a batch the publisher gives up purges librdkafka's whole queue,
dead-letter records with it; those are not acknowledged, so they are produced again next sweep (one
that was in flight may have landed: a duplicate, uncounted).

The record: the event's key; its value, or none when the event failed for its size (the broker's
or librdkafka's MSG_SIZE_TOO_LARGE / RECORD_LIST_TOO_LARGE / INVALID_MSG_SIZE, or a value larger
than OUTBOX_MAX_PAYLOAD_BYTES) or the dead-letter topic refused it alone for its size, then
`kaireon-dlq-truncated: true`; the headers the event's own record carries (kafka/records.py:
event-id, event-type, created-at, its own) and kaireon-dlq-event-id (always, own-only rows too),
-topic, -key, -attempts, -error (at most ERROR_BYTES), -at (when it was produced).

Ordering: a failed event does not hold its key in strict order (README, "Ordering"): the later events
of its key are published while it waits to be dead-lettered, so its dead-letter record can come after
them. A dead-lettered one holds nothing either; the claim is unchanged.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from kaireon_pub import metrics
from kaireon_pub.db.queries import int_array, load
from kaireon_pub.errors import new_error_id
from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka.errors import describe
from kaireon_pub.worker.kafka.records import PoisonRow, record_headers, record_key
from kaireon_pub.worker.lifecycle import TaskSet, every
from kaireon_pub.worker.rows import Row

log = logging.getLogger("kaireon_pub.worker")

DLQ = load("deadletter.sql")
BATCH = 50  # failed rows per sweep (their values are read: bounded memory)
WATCH_S = 1.0  # how often the sweep looks for rows this worker just failed (in memory, no query)
RETRY_S = 5.0  # the next (full) sweep after one with an error
FULL_S = 300.0  # a full sweep at least this often (rows failed elsewhere: another worker, an operator)
LOOKBACK_S = 300  # a recent sweep looks at the rows failed this long ago at most
ERROR_BYTES = 1000  # the kaireon-dlq-error header, at most
# The event failed for its size: its dead-letter record carries no value (it would be refused again).
SIZE_ERRORS = ("MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_MSG_SIZE")
TRUNCATED = ("kaireon-dlq-truncated", b"true")


def truncated(row: Row, error: str | None, max_payload_bytes: int) -> bool:
    """Whether the event's value stays out of its dead-letter record: it failed for its size."""
    if error is not None and error.startswith(SIZE_ERRORS):
        return True
    return row.payload is not None and len(row.payload) > max_payload_bytes


def dead_letter_record(row: Row, error: str | None, settings: Settings,
                       now: datetime.datetime) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(key, value, headers) of the event's dead-letter record."""
    source = settings.cloudevents_source if settings.cloudevents else None
    try:
        headers = record_headers(row, source)
    except PoisonRow:
        # Its headers are what failed it (not a JSON object): the record names the event without them.
        headers = [("event-id", b"%d" % row.id), ("created-at", row.created_iso.encode())]
    key = record_key(row)
    headers += [
        ("kaireon-dlq-event-id", b"%d" % row.id),  # own-only rows carry no event-id header of their own
        ("kaireon-dlq-topic", row.topic.encode()),
        ("kaireon-dlq-attempts", b"%d" % row.attempts),
        ("kaireon-dlq-error", (error or "").encode()[:ERROR_BYTES]),
        ("kaireon-dlq-at", now.isoformat(timespec="microseconds").replace("+00:00", "Z").encode()),
    ]
    if key is not None:
        headers.append(("kaireon-dlq-key", key))
    if truncated(row, error, settings.max_payload_bytes):
        return key, None, headers + [TRUNCATED]
    return key, row.payload, headers


def failed_so_far() -> float:
    """This process's count of events settled `failed` (kaireon_outbox_processed_total)."""
    for family in metrics.PROCESSED.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("outcome") == "failed":
                return sample.value
    return 0.0


class DeadLetters:
    """One worker's sweep. `owned()` gives its leased shards; `publisher()` its current producer
    (None before boot made it); `pool` its connections."""

    def __init__(self, settings: Settings, pool: Any, owned: Callable[[], list[int]],
                 publisher: Callable[[], Any], *, clock: Callable[[], float] = time.monotonic,
                 failed_count: Callable[[], float] = failed_so_far):
        self.settings = settings
        self.topic = settings.dead_letter_topic
        self.pool = pool
        self.owned = owned
        self.publisher = publisher
        self.clock = clock
        self.failed_count = failed_count
        self.full_due = 0.0  # the next full sweep, on the clock; 0: at once
        self.full_shards: set[int] = set()  # the shards the last full sweep looked at
        self.recent_more = False  # the last recent sweep filled its batch: another at once
        # Each walk (full: False, recent: True): its keyset cursor (updated_at, id), and the ids refused in it.
        self.after: dict[bool, tuple[Any, int] | None] = {False: None, True: None}
        self.refused: dict[bool, set[int]] = {False: set(), True: set()}
        self.waiting: set[int] = set()  # refused and not dead-lettered since: kaireon_outbox_dead_letter_waiting
        self.failed_seen = failed_count()
        self.wait_s = settings.message_timeout_ms / 1000 + 1.0

    async def once(self) -> float:
        """One look (every WATCH_S, in memory): a full sweep when one is due or the shards changed,
        a recent one when this worker failed rows since the last look; the pause before the next."""
        now = self.clock()
        shards = sorted(self.owned())
        failed = self.failed_count()
        if now >= self.full_due or set(shards) != self.full_shards:
            if set(shards) != self.full_shards:  # a new walk, over the new shards
                self.after[False], self.refused[False] = None, set()
            self.full_shards = set(shards)
            self.failed_seen = failed  # a full sweep sees them too
            outcome = await self.sweep(shards, recent=False)
            self.full_due = self.clock() + {"more": 0.0, "error": RETRY_S}.get(outcome, FULL_S)
            return 0.0 if outcome == "more" else WATCH_S
        if failed == self.failed_seen and not self.recent_more:
            return WATCH_S
        self.failed_seen = failed
        outcome = await self.sweep(shards, recent=True)
        self.recent_more = outcome == "more"
        if outcome == "error":
            self.full_due = min(self.full_due, self.clock() + RETRY_S)
        return 0.0 if self.recent_more else WATCH_S

    def on_error(self, exc: Exception) -> float:
        """A sweep that raised (the database, the client): logged, counted, a full one in RETRY_S."""
        metrics.DEAD_LETTER_ERRORS.inc()
        log.error(f"dead-letter sweep failed: {type(exc).__name__}: {exc}; trying again in {RETRY_S:g} s",
                  extra={"event": "dead letter failed", "errorId": new_error_id(), "isTransient": True})
        self.full_due = self.clock() + RETRY_S
        return WATCH_S

    async def sweep(self, shards: list[int], *, recent: bool) -> str:
        """The walk's next batch of this worker's failed rows (recent ones only, or all): "more" when full,
        else the walk is over (its cursor back to the oldest): "error" if it had a refusal, else "done"."""
        publisher = self.publisher()
        if not shards or publisher is None:
            self.waiting.clear()
            metrics.DEAD_LETTER_WAITING.set(0)
            return "done"
        query = DLQ.dead_letter_due_recent if recent else DLQ.dead_letter_due
        after_at, after_id = self.after[recent] or (None, 0)
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, {"shards": int_array(shards), "limit": BATCH, "lookback_s": LOOKBACK_S,
                                             "after_at": after_at, "after_id": after_id})
            due = [(Row(*r[:13]), r[13], r[14]) for r in await cur.fetchall()]
        acked, errors = await self.produce(publisher, [(row, error) for row, error, _ in due])
        marked: list[int] = []
        if acked:
            async with self.pool.connection() as conn:
                cur = await conn.execute(DLQ.mark_dead_lettered, {"ids": int_array(acked)})
                marked = [r[0] for r in await cur.fetchall()]
            metrics.DEAD_LETTERED.inc(len(marked))
            if len(marked) < len(acked):
                metrics.DEAD_LETTER_UNMARKED.inc(len(acked) - len(marked))
                log.warning("dead-letter records acknowledged for rows no longer waiting (requeued, purged, or "
                            "dead-lettered by another worker): those events may have two dead-letter records",
                            extra={"event": "dead letter unmarked", "events": len(acked) - len(marked)})
        # The gauge: a recent walk only adds and removes; a whole full walk drops those it did not find refused.
        self.waiting = (self.waiting - set(acked)) | errors.keys()
        self.refused[False] |= errors.keys()
        refused = self.refused[recent] = self.refused[recent] | errors.keys()
        more = len(due) == BATCH
        if more:
            self.after[recent] = (due[-1][2], due[-1][0].id)
        else:
            self.after[recent], self.refused[recent] = None, set()
            if not recent:
                self.waiting &= refused
        metrics.DEAD_LETTER_WAITING.set(len(self.waiting))
        if marked:
            log.info(f"dead-lettered {len(marked)} failed events to {self.topic}",
                     extra={"event": "dead lettered", "events": len(marked), "topic": self.topic})
        if errors:
            metrics.DEAD_LETTER_ERRORS.inc(len(errors))
            first_id, first_error = next(iter(errors.items()))
            log.error(f"dead-letter records not acknowledged: {first_error}; their events stay failed and "
                      f"are produced again when the sweep starts over ({RETRY_S:g} s after its end)",
                      extra={"event": "dead letter failed", "errorId": new_error_id(), "isTransient": True,
                             "events": len(errors), "eventId": first_id, "topic": self.topic,
                             "error": first_error})
        return "more" if more else "error" if refused else "done"

    async def produce(self, publisher: Any, due: list[tuple[Row, str | None]]) -> tuple[list[int], dict[int, str]]:
        """(acknowledged ids, {id: error}); a record batch is refused whole (kafka/errors.py): one refused for
        its size is produced again alone (if it was not), then without its value (kaireon-dlq-truncated)."""
        now = datetime.datetime.now(datetime.UTC)
        records = {row.id: dead_letter_record(row, error, self.settings, now) for row, error in due}
        acked, errors = await self.send(publisher, records)
        for event_id in [i for i, e in errors.items() if e.startswith(SIZE_ERRORS)]:
            key, value, headers = records[event_id]
            tries = [(key, value, headers)] if len(records) > 1 else []
            if value is not None:
                tries.append((key, None, headers + [TRUNCATED]))
            for record in tries:
                ok, error = await self.send(publisher, {event_id: record})
                if ok:
                    acked += ok
                    del errors[event_id]
                    break
                errors[event_id] = error[event_id]
                if not errors[event_id].startswith(SIZE_ERRORS):
                    break
        return acked, errors

    async def send(self, publisher: Any, records: dict[int, tuple]) -> tuple[list[int], dict[int, str]]:
        """Produce the records together and wait for their reports: (acknowledged ids, {id: error})."""
        loop = asyncio.get_running_loop()
        reports: dict[int, asyncio.Future] = {}
        errors: dict[int, str] = {}
        producer = publisher.producer
        for event_id, (key, value, headers) in records.items():
            if publisher.broken:
                errors[event_id] = f"producer must be recreated: {publisher.broken}"
                continue
            future = loop.create_future()
            try:
                producer.produce(self.topic, value, key, headers=headers,
                                 on_delivery=partial(_report, loop, future))
            except BufferError:
                errors[event_id] = "librdkafka's local queue is full"
                continue
            except Exception as exc:  # noqa: BLE001 - the row stays failed and is produced again next sweep
                errors[event_id] = describe(exc.args[0]) if exc.args and hasattr(exc.args[0], "name") else str(exc)
                continue
            reports[event_id] = future
        deadline = self.clock() + self.wait_s
        pending = set(reports.values())
        while pending and not publisher.broken and self.clock() < deadline:
            _, pending = await asyncio.wait(pending, timeout=min(0.5, max(0.0, deadline - self.clock())))
        acked = []
        for event_id, future in reports.items():
            if not future.done():
                errors[event_id] = "delivery not confirmed before the deadline"
                future.cancel()
            elif future.result() is None:
                acked.append(event_id)
            else:
                errors[event_id] = future.result()
        return acked, errors


def _report(loop: asyncio.AbstractEventLoop, future: asyncio.Future, err: Any, _msg: Any) -> None:
    """librdkafka's delivery callback (the delivery thread): None when acknowledged, else the error."""
    loop.call_soon_threadsafe(_settle, future, None if err is None else describe(err))


def _settle(future: asyncio.Future, result: str | None) -> None:
    if not future.done():
        future.set_result(result)


def start(worker: Any, stopping: Callable[[], bool], tasks: TaskSet | None = None) -> DeadLetters | None:
    """Start the worker's sweep when OUTBOX_DEAD_LETTER_TOPIC is set (loop.py's boot)."""
    if not worker.settings.dead_letter_topic:
        return None
    sweep = DeadLetters(worker.settings, worker.pool, lambda: list(worker.leases.owned),
                        lambda: worker.publisher)
    (tasks or worker.tasks).start("dead-letter", lambda: every(sweep.once, stopping, on_error=sweep.on_error))
    return sweep
