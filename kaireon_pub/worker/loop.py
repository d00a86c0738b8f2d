"""One publisher worker: claim a batch of its shards, publish it, mark it; repeat.

The loop is `run_once()` (one tick) inside `run()` (leases, waking, stopping, the failure streak).
Ticks that fail are classified: transient failures back off and retry; non-transient ones feed
a streak that ends the worker with exit code 3 after OUTBOX_MAX_CONSECUTIVE_FAILURES in a row.
Every failed tick logs `outbox-publisher tick failed` with `isTransient` and an `errorId` that the
next attempt's line repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import psycopg_pool

from kaireon_pub import metrics
from kaireon_pub.db.connect import session_options
from kaireon_pub.db.queries import Q
from kaireon_pub.errors import ExitCode, SystemicError, TransientError, new_error_id
from kaireon_pub.ops.gauges import refresh_backlog_gauges
from kaireon_pub.settings import Settings
from kaireon_pub.worker.leases import Leases
from kaireon_pub.worker.publisher import BatchOutcome, Publisher

log = logging.getLogger("kaireon_pub.worker")

PENDING_EXACT_CAP = 100_000
GAUGES_DUTY = 0.02  # share of one core the backlog gauges may take
GAUGES_MAX_INTERVAL = 30.0  # seconds; staler than this helps no one
ZERO_CURSOR = (0, 0)


@dataclass
class TickResult:
    claimed: int = 0
    published: int = 0
    failed: int = 0
    retried: int = 0
    released: int = 0
    lease_lost: int = 0


def classify_db_error(exc: BaseException) -> bool:
    """True when a database failure is transient (retry), False when an operator must act."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return True
    if isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn,
                        psycopg.errors.UndefinedFunction, psycopg.errors.InsufficientPrivilege,
                        psycopg.errors.InvalidCatalogName, psycopg.errors.InvalidPassword,
                        psycopg.errors.InvalidAuthorizationSpecification)):
        return False
    if isinstance(exc, psycopg.OperationalError):
        text = str(exc)
        return not ("password authentication failed" in text or "does not exist" in text)
    if isinstance(exc, (psycopg.InterfaceError, psycopg.errors.QueryCanceled,
                        psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected,
                        psycopg.errors.LockNotAvailable)):
        return True
    return False


class Worker:
    def __init__(self, settings: Settings, slot: int, worker_id: uuid.UUID,
                 heartbeat: Callable[[], None], dead_worker_ids: list[uuid.UUID]):
        self.settings = settings
        self.slot = slot
        self.worker_id = worker_id
        self.heartbeat = heartbeat
        self.dead_worker_ids = dead_worker_ids
        self.leases = Leases(worker_id, slot, settings.lease_ttl_seconds)
        self.cursors: dict[int, tuple[int, int]] = {}
        self.rescan_at: dict[int, float] = {}
        self.next_full_rescan = time.monotonic() + settings.rescan_interval_ms / 1000
        self.rotation = 0
        self.stop_requested = False
        self.drain_deadline = float("inf")
        self.wake = asyncio.Event()
        self.streak = 0
        self.streak_transient = 0
        self.kafka_stalls = 0
        self.last_error_id: str | None = None
        self.unsettled: tuple[uuid.UUID, list[tuple], BatchOutcome] | None = None
        self.pool: psycopg_pool.AsyncConnectionPool | None = None
        self.listen_conn: psycopg.AsyncConnection | None = None
        self.publisher: Publisher | None = None
        self.background: list[asyncio.Task] = []
        self.last_claim_full = False
        self.parent_pid = os.getppid()
        self.strict = settings.ordering == "strict"

    # ---- signals (handlers only record the request) ------------------------------------------

    def request_stop(self) -> None:
        if self.stop_requested:
            # A second signal shortens the drain: purge and release now.
            self.drain_deadline = time.monotonic()
        else:
            self.stop_requested = True
            # Leave a margin inside the supervisor's budget for marking and releasing.
            budget = self.settings.shutdown_drain_timeout_ms / 1000
            self.drain_deadline = time.monotonic() + max(0.5, budget - 2.0)
        self.wake.set()

    def stop_deadline(self) -> float:
        return self.drain_deadline

    # ---- lifecycle -----------------------------------------------------------------------------

    async def boot(self) -> None:
        s = self.settings
        # The producer first: a bad librdkafka setting fails before any connection is opened.
        self.publisher = Publisher(s, client_id=f"kaireon-pub-{self.slot}")
        self.pool = psycopg_pool.AsyncConnectionPool(
            s.database_url, min_size=1, max_size=4, open=False, name=f"worker-{self.slot}",
            kwargs={"autocommit": True, **session_options(s, f"worker-{self.slot}", publisher=True)},
            timeout=5,
        )
        await self.pool.open(wait=False)
        if self.dead_worker_ids:
            await self._recover_dead_workers()
        if self.slot == 0:
            # Replica-wide housekeeping runs beside the claim loop, on its own connections,
            # so its queries never delay a batch.
            self.background.append(asyncio.create_task(self._gauges_loop()))
            if s.retention_seconds > 0:
                self.background.append(asyncio.create_task(self._purge_loop()))

    async def _recover_dead_workers(self) -> None:
        """Rows a crashed predecessor in this slot had claimed go back to pending at once."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(Q.reset_worker_claims, {"worker_ids": self.dead_worker_ids})
            reset, released = await cur.fetchone()
            if reset:
                await conn.execute(Q.notify_rescan)
        log.info("recovered a crashed worker's claims", extra={
            "event": "crash recovery", "resetCount": reset, "releasedShards": released,
            "deadWorkers": [str(w) for w in self.dead_worker_ids]})
        self.dead_worker_ids = []

    async def shutdown(self) -> None:
        for task in self.background:
            task.cancel()
        if self.pool is None:
            return  # boot failed before anything was opened
        try:
            if self.unsettled:
                await self._settle_again()
            async with self.pool.connection(timeout=2) as conn:
                released = await self.leases.release_all(conn)
            log.info("drain finished; shards released", extra={"event": "drain done", "shards": released})
        except Exception as exc:  # noqa: BLE001 - the drain must finish; the error is logged with an id
            log.error(f"drain could not release shards: {type(exc).__name__}: {exc}",
                      extra={"event": "drain failed", "errorId": new_error_id(), "isTransient": True})
        if self.publisher:
            self.publisher.producer.flush(0)
        if self.listen_conn:
            await self.listen_conn.close()
        if self.pool is not None:
            await self.pool.close(timeout=2)
        metrics.IN_FLIGHT.set(0)

    async def run(self) -> int:
        try:
            await self.boot()
            while not self.stop_requested:
                self.heartbeat()
                if os.getppid() != self.parent_pid:
                    log.error("supervisor is gone; stopping", extra={"event": "orphaned"})
                    break
                started = time.monotonic()
                try:
                    result = await self.tick()
                except Exception as exc:  # noqa: BLE001 - every failure is classified and logged
                    exit_code = self._tick_failed(exc)
                    if exit_code is not None:
                        return exit_code
                    await self.wait_for_work(self._failure_backoff())
                    continue
                finally:
                    metrics.TICK_DURATION.observe(time.monotonic() - started)
                self._tick_succeeded()
                if result.claimed == 0:
                    # Never sleep through a lease renewal, whatever the poll interval.
                    until_renewal = max(0.0, self.leases.next_rebalance - time.monotonic())
                    await self.wait_for_work(min(self.settings.poll_interval_ms / 1000, until_renewal))
            return ExitCode.OK
        finally:
            await self.shutdown()

    # ---- one tick --------------------------------------------------------------------------------

    async def tick(self) -> TickResult:
        if self.unsettled:
            await self._settle_again()
        if self.leases.due():
            await self._rebalance()
        return await self.run_once()

    async def run_once(self) -> TickResult:
        """Claim one batch of the owned shards, publish it, settle every event. O(batch)."""
        self._apply_rescans()
        shards = self._rotated_shards()
        if not shards or self.stop_requested:  # a drain stops claiming at once
            return TickResult()
        s = self.settings
        params = {
            "shards": shards,
            "epochs": [self.leases.owned[sh] for sh in shards],
            "cursor_xids": [str(self.cursors.get(sh, ZERO_CURSOR)[0]) for sh in shards],
            "cursor_ids": [self.cursors.get(sh, ZERO_CURSOR)[1] for sh in shards],
            "worker_id": self.worker_id, "relaxed": not self.strict, "batch": s.batch_size,
        }
        if s.claim_mode == "lock":
            return await self._run_once_locked(params)
        token = uuid.uuid4()
        async with self.pool.connection() as conn:
            cur = await conn.execute(Q.claim_batch, {**params, "token": token, "staleness": s.reaper_staleness_seconds})
            rows = await cur.fetchall()
        self.last_claim_full = len(rows) >= s.batch_size
        if not rows:
            return TickResult()
        self._advance_cursors(rows)
        outcome = await self._publish(rows)
        return await self._settle(token, rows, outcome)

    async def _run_once_locked(self, params: dict) -> TickResult:
        """Lock mode: one transaction per batch; its row locks are the claim, one write per event."""
        async with self.pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(Q.claim_locked_batch, params)
                rows = await cur.fetchall()
                self.last_claim_full = len(rows) >= self.settings.batch_size
                if not rows:
                    return TickResult()
                self._advance_cursors(rows)
                outcome = await self._publish(rows)
                result, retry_rows = await self._write_outcome(conn, None, rows, outcome)
        self._after_settle(rows, outcome, retry_rows, result)
        return result

    def _advance_cursors(self, rows: list[tuple]) -> None:
        # Per-key order is (xid, id) within a shard; keys never span shards.
        rows.sort(key=lambda r: (r[8], r[0]))
        for row in rows:
            shard, position = row[7], (row[8], row[0])
            if position > self.cursors.get(shard, ZERO_CURSOR):
                self.cursors[shard] = position

    async def _publish(self, rows: list[tuple]) -> BatchOutcome:
        metrics.IN_FLIGHT.inc(len(rows))
        try:
            deadline = time.monotonic() + self.settings.message_timeout_ms / 1000 + 1.0
            try:
                outcome = await self.publisher.publish(rows, self.strict, deadline, self.stop_deadline)
            except Exception as exc:  # noqa: BLE001 - never leave claimed rows behind
                outcome = BatchOutcome(released=[r[0] for r in rows],
                                       transient_error=f"{type(exc).__name__}: {exc}")
            if self.publisher.fatal is not None and not outcome.fatal_error:
                outcome.fatal_error = f"{self.publisher.fatal.name()}: {self.publisher.fatal.str()}"
            return outcome
        finally:
            metrics.IN_FLIGHT.dec(len(rows))

    async def _write_outcome(self, conn: psycopg.AsyncConnection, token: uuid.UUID | None,
                             rows: list[tuple], outcome: BatchOutcome) -> tuple[TickResult, list[tuple]]:
        """The marks of one batch. With a token (status mode) each lands only while the claim stands;
        without one (lock mode) the caller's open transaction holds the rows."""
        s = self.settings
        locked = token is None
        result = TickResult(claimed=len(rows))
        retry_rows: list[tuple] = []
        if outcome.delivered:
            if locked:
                query = Q.delete_published_locked if s.delete_on_publish else Q.mark_published_locked
            else:
                query = Q.delete_published if s.delete_on_publish else Q.mark_published
            cur = await conn.execute(query, {"ids": outcome.delivered, "token": token})
            result.published = cur.rowcount
            result.lease_lost = len(outcome.delivered) - cur.rowcount
        failed_ids = list(outcome.rejected) + list(outcome.retry)
        if failed_ids:
            cur = await conn.execute(Q.mark_retry_locked if locked else Q.mark_retry, {
                "ids": failed_ids,
                "errors": [outcome.rejected.get(i) or outcome.retry.get(i) for i in failed_ids],
                "permanent": [i in outcome.rejected for i in failed_ids],
                "max_attempts": s.max_attempts, "backoff_base_ms": s.backoff_base_ms,
                "backoff_max_ms": s.backoff_max_ms, "token": token,
            })
            retry_rows = await cur.fetchall()
        if outcome.released and not locked:
            await conn.execute(Q.release_claimed, {"ids": outcome.released, "token": token})
        return result, retry_rows

    async def _settle(self, token: uuid.UUID, rows: list[tuple], outcome: BatchOutcome) -> TickResult:
        try:
            async with self.pool.connection() as conn:
                # A transaction only when there are several statements: all delivered is one mark.
                several = outcome.released or outcome.rejected or outcome.retry
                async with conn.transaction() if several else contextlib.nullcontext():
                    result, retry_rows = await self._write_outcome(conn, token, rows, outcome)
        except Exception:
            # Delivered but not marked: keep the outcome and settle it before the next claim,
            # instead of leaving the rows to the reaper (and to duplicates).
            self.unsettled = (token, rows, outcome)
            raise
        self.unsettled = None
        self._after_settle(rows, outcome, retry_rows, result)
        return result

    async def _settle_again(self) -> None:
        token, rows, outcome = self.unsettled
        log.info("settling a batch left unmarked by a failed tick",
                 extra={"event": "settle retry", "errorId": self.last_error_id, "events": len(rows)})
        await self._settle(token, rows, outcome)

    def _after_settle(self, rows: list[tuple], outcome: BatchOutcome, retry_rows: list[tuple],
                      result: TickResult) -> None:
        by_id = {r[0]: r for r in rows}
        for _event_id, status, shard, _xid, due_in in retry_rows:
            if status == "failed":
                result.failed += 1
            else:
                result.retried += 1
                if not self.strict:
                    # Relaxed ordering: the key keeps flowing past this event; count the skip.
                    metrics.ORDER_VIOLATIONS.inc()
                # A retry waits behind this worker's cursor: rescan its shard when it is due.
                due = time.monotonic() + max(0.0, due_in) + 0.01
                self.rescan_at[shard] = min(self.rescan_at.get(shard, float("inf")), due)
        # Rows back in pending (released), and successors of a settled retry that the claim held
        # back, sit behind the cursor: move the cursor back to them.
        for event_id in outcome.released:
            row = by_id[event_id]
            self._rewind(row[7], (row[8], row[0] - 1))
        for row in rows:
            # Settled after a retry, or rejected now: later events of its key may be waiting.
            if row[6] > 0 or row[0] in outcome.rejected:
                self._rewind(row[7], (row[8], row[0]))
        result.released = len(outcome.released)
        if outcome.ages:
            metrics.observe_many(metrics.EVENT_AGE, outcome.ages)
        metrics.PROCESSED.labels("published").inc(result.published)
        if result.failed:
            metrics.PROCESSED.labels("failed").inc(result.failed)
        if result.retried:
            metrics.PROCESSED.labels("retried").inc(result.retried)
        if result.lease_lost:
            metrics.LEASE_LOST.inc(result.lease_lost)
            log.warning("mark found claims gone (reaped or handed over); those events may be duplicated",
                        extra={"event": "lease lost", "leaseLost": result.lease_lost})
        for event_id, error in outcome.rejected.items():
            log.warning(f"event rejected: {error}", extra={"event": "event failed", "eventId": event_id})
        # A producer whose batches keep timing out while nothing is delivered may be wedged on
        # a broker that came back without its idempotence state: start afresh after two.
        self.kafka_stalls = self.kafka_stalls + 1 if outcome.transient_error and not outcome.delivered else 0
        if self.kafka_stalls >= 2 and not outcome.fatal_error:
            self.kafka_stalls = 0
            metrics.PRODUCER_RECREATED.inc()
            log.warning("recreating the producer after repeated undelivered batches",
                        extra={"event": "producer recreated", "reason": outcome.transient_error})
            self.publisher.recreate()
        if outcome.fatal_error:
            metrics.PRODUCER_RECREATED.inc()
            log.warning(f"recreating the producer after a fatal error: {outcome.fatal_error}",
                        extra={"event": "producer recreated", "released": len(outcome.released)})
            self.publisher.recreate()
            raise TransientError(f"fatal producer error: {outcome.fatal_error}")
        if outcome.systemic_error:
            raise SystemicError(outcome.systemic_error)
        if outcome.transient_error:
            raise TransientError(outcome.transient_error)

    # ---- cursors ---------------------------------------------------------------------------------

    def _rewind(self, shard: int, position: tuple[int, int]) -> None:
        if shard in self.cursors and position < self.cursors[shard]:
            self.cursors[shard] = position

    def _apply_rescans(self) -> None:
        now = time.monotonic()
        if now >= self.next_full_rescan:
            self.cursors.clear()
            self.rescan_at.clear()
            self.next_full_rescan = now + self.settings.rescan_interval_ms / 1000
            return
        for shard in [sh for sh, at in self.rescan_at.items() if at <= now]:
            self.cursors.pop(shard, None)
            del self.rescan_at[shard]

    def _rotated_shards(self) -> list[int]:
        shards = sorted(self.leases.owned)
        if not shards:
            return []
        self.rotation = (self.rotation + 1) % len(shards)
        return shards[self.rotation:] + shards[:self.rotation]

    # ---- leases and housekeeping ----------------------------------------------------------------

    async def _rebalance(self) -> None:
        try:
            async with self.pool.connection() as conn:
                result = await self.leases.rebalance(conn)
        except Exception:
            metrics.LEASE_RENEWAL_FAILURES.inc()
            raise
        for shard in result.acquired:
            self.cursors.pop(shard, None)
        for shard in result.released + result.lost:
            self.cursors.pop(shard, None)
            self.rescan_at.pop(shard, None)
        if result.lost:
            metrics.LEASE_RENEWAL_FAILURES.inc()
            log.warning("leases expired before renewal", extra={"event": "lease expired", "shards": result.lost})
        if result.acquired:
            metrics.HANDOVERS.labels("acquired").inc(len(result.acquired))
        if result.released:
            metrics.HANDOVERS.labels("released").inc(len(result.released))
        if result.acquired or result.released or result.lost:
            log.info("shard ownership changed", extra={
                "event": "rebalance", "liveWorkers": result.live_workers, "owned": len(self.leases.owned),
                "acquired": len(result.acquired), "released": len(result.released),
                "lost": len(result.lost), "resetRows": result.reset_rows})
        metrics.SHARDS_OWNED.labels(str(self.slot)).set(len(self.leases.owned))

    async def _gauges_loop(self) -> None:
        """The pending count and the backlog gauges, for the whole replica: every poll interval,
        or less often when they get expensive.

        Their statements are bounded, but on a large backlog that is draining they walk the index
        entries the claims just left dead (each shard's head, the capped counts): measured at
        0.2–0.9 s of database time per refresh during a 1,000,000-event drain. A duty cycle keeps
        them under GAUGES_DUTY of one core, so the gauges never slow the drain they report on.
        """
        while not self.stop_requested:
            started = time.monotonic()
            try:
                await self.refresh_pending_count()
            except Exception as exc:  # noqa: BLE001 - a gauge failure must not stop the publisher
                log.warning(f"pending count refresh failed: {type(exc).__name__}: {exc}",
                            extra={"event": "gauges failed", "errorId": new_error_id(), "isTransient": True})
            took = time.monotonic() - started
            await asyncio.sleep(max(self.settings.poll_interval_ms / 1000, min(GAUGES_MAX_INTERVAL, took / GAUGES_DUTY)))

    async def refresh_pending_count(self) -> None:
        """Bounded cost: an exact count up to a cap, the planner's estimate above it."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(Q.pending_count, {"cap": PENDING_EXACT_CAP})
            count = (await cur.fetchone())[0]
            estimated = count >= PENDING_EXACT_CAP
            if estimated:
                cur = await conn.execute(Q.pending_estimate)
                count = max(count, int((await cur.fetchone())[0] or 0))
            await refresh_backlog_gauges(conn)
        metrics.PENDING.set(count)
        metrics.PENDING_ESTIMATED.set(1 if estimated else 0)

    async def _purge_loop(self) -> None:
        """Retention: delete published rows older than OUTBOX_RETENTION_SECONDS, in bounded batches.

        Its own connection and short statements, with a pause between batches, so the claim
        (a different index, different rows) is not slowed while it runs."""
        s = self.settings
        while not self.stop_requested:
            delay = s.purge_interval_seconds
            if self.last_claim_full:
                # A backlog is draining: the claim has the database's full attention.
                await asyncio.sleep(1.0)
                continue
            started = time.monotonic()
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(Q.purge_published, {"retention": s.retention_seconds,
                                                                 "batch": s.purge_batch_size})
                    purged = (await cur.fetchone())[0]
                took = time.monotonic() - started
                metrics.PURGE_DURATION.observe(took)
                metrics.PURGED.inc(purged)
                if purged >= s.purge_batch_size:
                    # More to do: keep going on a 10 % duty cycle.
                    delay = max(0.1, 9 * took)
            except Exception as exc:  # noqa: BLE001 - the purge must never stop the publisher
                log.error(f"retention purge failed: {type(exc).__name__}: {exc}",
                          extra={"event": "purge failed", "errorId": new_error_id(), "isTransient": True})
            await asyncio.sleep(delay)

    # ---- waiting ---------------------------------------------------------------------------------

    async def wait_for_work(self, timeout: float) -> None:
        """Sleep until NOTIFY (enqueue commits), a stop, or `timeout`; heartbeat at least every second."""
        deadline = time.monotonic() + timeout
        while not self.stop_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.heartbeat()
            if await self._wait_notify(min(1.0, remaining)):
                return

    async def _wait_notify(self, timeout: float) -> bool:
        try:
            if self.listen_conn is None or self.listen_conn.closed:
                self.listen_conn = await psycopg.AsyncConnection.connect(
                    self.settings.database_url, autocommit=True,
                    **session_options(self.settings, f"worker-{self.slot}-listen", publisher=True))
                await self.listen_conn.execute("LISTEN kaireon_outbox")
                await self.listen_conn.execute("LISTEN kaireon_outbox_rescan")
            woke = False
            async for note in self.listen_conn.notifies(timeout=timeout, stop_after=1):
                woke = True
                self._on_notify(note.channel)
            if woke:
                # Drain what else is buffered, so a burst of commits wakes us once.
                async for note in self.listen_conn.notifies(timeout=0.001):
                    self._on_notify(note.channel)
            return woke
        except psycopg.Error:
            # The database is away: fall back to polling; the tick reports the failure.
            if self.listen_conn is not None:
                await self.listen_conn.close()
            self.listen_conn = None
            await asyncio.sleep(timeout)
            return False

    def _on_notify(self, channel: str) -> None:
        if channel == "kaireon_outbox_rescan":
            self.cursors.clear()

    # ---- failure accounting ------------------------------------------------------------------------

    def _tick_failed(self, exc: BaseException) -> int | None:
        if isinstance(exc, TransientError):
            transient = True
        elif isinstance(exc, SystemicError):
            transient = False
        elif isinstance(exc, psycopg.Error | psycopg_pool.PoolTimeout):
            transient = classify_db_error(exc)
        else:
            transient = False
        error_id = new_error_id()
        self.last_error_id = error_id
        metrics.TICK_FAILURES.labels("true" if transient else "false").inc()
        if transient:
            self.streak_transient += 1
        else:
            self.streak += 1
        log.error(
            "outbox-publisher tick failed",
            exc_info=exc if not isinstance(exc, TransientError | SystemicError | psycopg.Error) else None,
            extra={"event": "tick failed", "errorId": error_id, "isTransient": transient,
                   "error": f"{type(exc).__name__}: {exc}", "consecutiveFailures": self.streak},
        )
        if self.streak >= self.settings.max_consecutive_failures:
            log.critical(
                f"{self.streak} consecutive non-transient failures; exiting with code 3",
                extra={"event": "giving up", "errorId": error_id, "isTransient": False},
            )
            return ExitCode.NON_TRANSIENT
        return None

    def _failure_backoff(self) -> float:
        transient_streak = self.streak_transient
        base = self.settings.poll_interval_ms / 1000
        delay = min(base * (2 ** min(transient_streak, 5)), 30.0) if transient_streak else base
        log.info("outbox-publisher retrying tick", extra={
            "event": "tick retry", "errorId": self.last_error_id, "delaySeconds": round(delay, 3)})
        return delay

    def _tick_succeeded(self) -> None:
        if self.last_error_id:
            log.info("outbox-publisher tick recovered", extra={"event": "tick recovered", "errorId": self.last_error_id})
        self.streak = 0
        self.streak_transient = 0
        self.last_error_id = None
        metrics.LAST_SUCCESS.set(time.time())
