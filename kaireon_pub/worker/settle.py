"""Settling a published batch: its marks, then what they mean for the scan and the counters.

A published row's mark records where its record landed (published_partition, published_offset,
from the delivery report: `landed`; NULL when librdkafka gave no offset: nullable_int_array); a row
deleted on publish keeps nothing.

Every event of a batch ends delivered (marked published or deleted), rejected (failed), to retry
(pending again with a back-off), or released (pending again now). In status mode each mark lands
only while the claim's token stands (a reaped or handed-over claim counts as lease lost; a published
row keeps its token, so a mark made again after its reply was lost finds what it marked); in lock
mode the caller's open transaction holds the rows. A batch whose marks fail after delivery is kept
(`unsettled`) and settled again before the next claim, instead of being left to the reaper (and to
duplicates). In lock mode the marks roll back with the claiming transaction (its session ended
between delivery and commit): unless the server says that transaction committed (only the commit's
reply was lost), they are made again on the rows still pending as the claim found them; a
delivered row no longer pending (another claim took it meanwhile) counts as lease lost, "may be
duplicated". A row deleted on publish keeps no token for a delete made again to find: in status
mode too the delete runs in a transaction of its own whose id is read before the commit, and when
only the commit's reply was lost the server is asked in the same way, so nothing is counted lost.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Sequence
from operator import itemgetter
from typing import NamedTuple

import psycopg
import psycopg_pool

from kaireon_pub import metrics
from kaireon_pub.db.queries import Q, int_array
from kaireon_pub.errors import SystemicError, TransientError
from kaireon_pub.settings import Settings
from kaireon_pub.worker.health import ProducerHealth
from kaireon_pub.worker.kafka.outcome import BatchOutcome
from kaireon_pub.worker.rows import Row, TickResult
from kaireon_pub.worker.scan import ShardScan

log = logging.getLogger("kaireon_pub.worker")


class Unsettled(NamedTuple):
    """A batch published whose marks did not land: settled again before the next claim."""

    token: uuid.UUID | None  # None: lock mode, whose marks rolled back with the claiming transaction
    rows: list[Row]
    outcome: BatchOutcome
    # Lock mode or delete-on-publish, the marks written and only the commit unreported: its
    # transaction's id and what the marks wrote, in case the server says it committed.
    xact: int | None = None
    written: tuple[TickResult, list[tuple]] | None = None


class Settler:
    def __init__(self, settings: Settings, scan: ShardScan, health: ProducerHealth):
        self.settings = settings
        self.scan = scan
        self.health = health
        self.unsettled: Unsettled | None = None

    async def write_outcome(self, conn: psycopg.AsyncConnection, token: uuid.UUID | None,
                            rows: list[Row], outcome: BatchOutcome, *,
                            again: bool = False) -> tuple[TickResult, list[tuple]]:
        """The marks of one batch. With a token (status mode) each lands only while the claim stands;
        without one (lock mode) the caller's open transaction holds the rows, or, `again` (its
        transaction rolled back), each lands only on a row still as the claim found it."""
        s = self.settings
        locked = token is None
        if locked and not again:
            # Until after_settle reports the commit: should the transaction end without one (its
            # session died, a mark or the commit failed), the batch is settled before the next claim.
            self.unsettled = Unsettled(None, rows, outcome)
        result = TickResult(claimed=len(rows))
        retry_rows: list[tuple] = []
        xact = None
        if outcome.delivered:
            if again:
                query = Q.delete_published_again if s.delete_on_publish else Q.mark_published_again
            elif locked:
                query = Q.delete_published_locked if s.delete_on_publish else Q.mark_published_locked
            else:
                query = Q.delete_published if s.delete_on_publish else Q.mark_published
            if s.delete_on_publish:  # a deleted row keeps nothing of where it landed
                params = {"ids": int_array(outcome.delivered), "token": token}
            else:
                params = {**landed(outcome), "token": token}
            cur = await conn.execute(query, params)
            if locked and not again:
                marked, xact = await cur.fetchone()
            else:
                marked = cur.rowcount
            result.published = marked
            result.lease_lost = len(outcome.delivered) - marked
        failed_ids = list(outcome.rejected) + list(outcome.retry)
        if failed_ids:
            attempts = {r.id: r.attempts for r in rows}
            retry = Q.mark_retry_again if again else Q.mark_retry_locked if locked else Q.mark_retry
            cur = await conn.execute(retry, {
                "ids": failed_ids,
                "errors": [outcome.rejected.get(i) or outcome.retry.get(i) for i in failed_ids],
                "permanent": [i in outcome.rejected for i in failed_ids],
                "max_attempts": s.max_attempts, "backoff_base_ms": s.backoff_base_ms,
                "backoff_max_ms": s.backoff_max_ms, "token": token,
                "attempts": [attempts[i] for i in failed_ids],
            })
            retry_rows = await cur.fetchall()
        if outcome.released and not locked:
            await conn.execute(Q.release_claimed, {"ids": int_array(outcome.released), "token": token})
        if locked and not again and xact is not None:
            self.unsettled = Unsettled(None, rows, outcome, xact, (result, retry_rows))
        return result, retry_rows

    async def settle(self, pool: psycopg_pool.AsyncConnectionPool, token: uuid.UUID, rows: list[Row],
                     outcome: BatchOutcome) -> TickResult:
        # Until the marks are reported: delivered but not marked, the batch is settled before the
        # next claim, instead of leaving the rows to the reaper (and to duplicates).
        self.unsettled = Unsettled(token, rows, outcome)
        async with pool.connection() as conn:
            # A transaction only when there are several statements (all delivered is one mark), or
            # for a delete: its commit apart, so its transaction's id comes back before the commit.
            several = self.settings.delete_on_publish or outcome.released or outcome.rejected or outcome.retry
            async with conn.transaction() if several else contextlib.nullcontext():
                result, retry_rows = await self.write_outcome(conn, token, rows, outcome)
                if self.settings.delete_on_publish and outcome.delivered:
                    # Read before the commit, whose reply may be lost: the server says then whether it landed.
                    xact = (await (await conn.execute(Q.current_xact)).fetchone())[0]
                    self.unsettled = Unsettled(token, rows, outcome, xact, (result, retry_rows))
        self.unsettled = None
        self.after_settle(rows, outcome, retry_rows, result)
        return result

    async def settle_again(self, pool: psycopg_pool.AsyncConnectionPool, error_id: str | None) -> None:
        token, rows, outcome, xact, written = self.unsettled
        log.info("settling a batch left unmarked by a failed tick", extra={
            "event": "settle retry", "errorId": error_id, "events": len(rows),
            "claimMode": "status" if token is not None else "lock"})
        if xact is not None and await self._committed(pool, xact):
            self.after_settle(rows, outcome, written[1], written[0])
            return
        if token is not None:
            await self.settle(pool, token, rows, outcome)
            return
        async with pool.connection() as conn:
            async with conn.transaction():
                result, retry_rows = await self.write_outcome(conn, None, rows, outcome, again=True)
        self.after_settle(rows, outcome, retry_rows, result)

    @staticmethod
    async def _committed(pool: psycopg_pool.AsyncConnectionPool, xact: int) -> bool:
        """Whether the batch's transaction committed: only its commit's reply is missing, and the
        server knows whether the marks landed."""
        async with pool.connection() as conn:
            status = (await (await conn.execute(Q.xact_status, {"xact": xact})).fetchone())[0]
        if status == "in progress":
            raise TransientError("the batch's transaction is still open on the server (its session lost)")
        return status == "committed"

    def after_settle(self, rows: list[Row], outcome: BatchOutcome, retry_rows: list[tuple],
                     result: TickResult) -> None:
        """The marks' consequences: retries counted and rescanned when due, cursors moved back to
        the rows behind them, the counters, the producer's health; the batch's error raised.
        Called once the marks have landed (in lock mode: committed), so nothing is left unsettled."""
        self.unsettled = None
        self._note_retries(retry_rows, result)
        self._rewind(rows, outcome)
        result.released = len(outcome.released)
        self._count(result, outcome)
        self.health.after_batch(outcome)
        raise_for(outcome)

    def _note_retries(self, retry_rows: list[tuple], result: TickResult) -> None:
        for _event_id, status, shard, _xid, due_in in retry_rows:
            if status == "failed":
                result.failed += 1
            else:
                result.retried += 1
                if not self.scan.strict:
                    # Relaxed ordering: the key keeps flowing past this event; count the skip.
                    metrics.ORDER_VIOLATIONS.inc()
                # A retry waits behind this worker's cursor: rescan its shard when it is due.
                self.scan.rescan_after(shard, due_in)

    def _rewind(self, rows: list[Row], outcome: BatchOutcome) -> None:
        # Rows back in pending (released), and successors of a settled retry that the claim held
        # back, sit behind the cursor: move the cursor back to them.
        if outcome.released:
            by_id = {r.id: r for r in rows}
            for event_id in outcome.released:
                row = by_id[event_id]
                self.scan.rewind(row.shard, (row.xid, row.id - 1))
        rejected = outcome.rejected
        for row in rows:
            # Settled after a retry, or rejected now: later events of its key may be waiting.
            if row.attempts > 0 or row.id in rejected:
                self.scan.rewind(row.shard, row.position)

    @staticmethod
    def _count(result: TickResult, outcome: BatchOutcome) -> None:
        if outcome.ages:
            metrics.observe_many(metrics.EVENT_AGE, outcome.ages)
        metrics.PROCESSED.labels("published").inc(result.published)
        if result.failed:
            metrics.PROCESSED.labels("failed").inc(result.failed)
        if result.retried:
            metrics.PROCESSED.labels("retried").inc(result.retried)
        if outcome.unconfirmed:
            metrics.UNCONFIRMED.inc(outcome.unconfirmed)
        if result.lease_lost:
            metrics.LEASE_LOST.inc(result.lease_lost)
            log.warning("mark found claims gone (reaped or handed over); those events may be duplicated",
                        extra={"event": "lease lost", "leaseLost": result.lease_lost})
        for event_id, error in outcome.rejected.items():
            log.warning(f"event rejected: {error}", extra={"event": "event failed", "eventId": event_id})


def landed(outcome: BatchOutcome) -> dict[str, str]:
    """The marks' ids, partitions and offsets (queries.sql, landed_set): the delivered ids sorted
    ascending, each position in the same order. An outcome whose positions do not match its ids
    (none the tier makes: delivery.py fills them together) marks them NULL: never a row unmarked."""
    ids: Sequence[int] = outcome.delivered
    partitions: Sequence[int | None] = outcome.partitions
    offsets: Sequence[int | None] = outcome.offsets
    n = len(ids)
    if not len(partitions) == len(offsets) == n:
        partitions = offsets = [None] * n
    if n > 1:  # itemgetter of one index gives the item, not a tuple
        pick = itemgetter(*sorted(range(n), key=ids.__getitem__))
        ids, partitions, offsets = pick(ids), pick(partitions), pick(offsets)
    return {"ids": nullable_int_array(ids), "partitions": nullable_int_array(partitions),
            "offsets": nullable_int_array(offsets)}


def nullable_int_array(values: Sequence[int | None]) -> str:
    """int_array for the positions of delivered events: None, or a negative number, is NULL.

    The NULL rule of published_partition / published_offset: an offset librdkafka reports as
    negative (OFFSET_INVALID -1001, or -1 for a retry the broker recognised as a duplicate,
    DUPLICATE_SEQUENCE_NUMBER: the record is stored, its offset unknown to the client) is no
    position; confluent-kafka's Message.offset() gives None for it. Most batches have none: one
    %-format in C (twice as fast as int_array's str() per number: a settle formats three arrays),
    and the slow path only when a None (the format's TypeError) or a minus sign turns up."""
    try:
        text = "{" + ("%d," * len(values))[:-1] % tuple(values) + "}"
    except TypeError:
        text = "-"
    if "-" in text:
        return "{" + ",".join("NULL" if v is None or v < 0 else str(v) for v in values) + "}"
    return text


def raise_for(outcome: BatchOutcome) -> None:
    """A batch's error as the tick's failure (the failure streak classifies it)."""
    if outcome.producer_error:
        raise TransientError(f"producer must be recreated: {outcome.producer_error}")
    if outcome.systemic_error:
        raise SystemicError(outcome.systemic_error)
    if outcome.transient_error:
        raise TransientError(outcome.transient_error)
