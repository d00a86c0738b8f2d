"""One publisher worker: claim a batch of its shards, publish it, settle it; repeat.

The worker is a few tasks side by side on one event loop, none waiting on another's slow step:
- the claim -> publish -> settle loop (`run()` around `run_once()`), with the failure streak;
- the lease keeper (worker/leases.py): renews leases and the registration on its own clock and
  connection, and rebalances;
- the broker watch: notices a different cluster behind the bootstrap address;
- worker 0's housekeeping (worker/housekeeping.py): backlog gauges and the retention purge;
- the producer's delivery thread (worker/publisher.py), which serves librdkafka busy or idle.

Ticks that fail are classified: transient failures back off and retry; non-transient ones feed
a streak that ends the worker with exit code 3 after OUTBOX_MAX_CONSECUTIVE_FAILURES in a row.
Every failed tick logs `outbox-publisher tick failed` with `isTransient` and an `errorId` that the
next attempt's line repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import time
import uuid
from collections.abc import Callable

import psycopg
import psycopg_pool

from kaireon_pub import metrics
from kaireon_pub.db.connect import (
    async_connector,
    connection_class,
    listen_connector,
    listen_url,
    session_options,
)
from kaireon_pub.db.queries import Q, int_array
from kaireon_pub.errors import ExitCode, SystemicError, TransientError, new_error_id
from kaireon_pub.settings import Settings
from kaireon_pub.worker import housekeeping, tracing
from kaireon_pub.worker.leases import LeaseKeeper, Leases, RebalanceResult
from kaireon_pub.worker.publisher import BatchOutcome, Publisher
from kaireon_pub.worker.rows import Row, TickResult
from kaireon_pub.worker.wake import Listener

log = logging.getLogger("kaireon_pub.worker")

ZERO_CURSOR = (0, 0)
CLAIM_ORDER = operator.itemgetter(8, 0)  # a claimed row's (xid, id): Row.position of the claim's tuple
ROW_FIELDS = len(Row._fields)
_as_row = tuple.__new__  # a Row from the claim's tuple as it is (its columns are Row's, in order)
MAX_PASSED_OVER = 10_000  # passed-over transactions remembered one by one
BROKER_WATCH_INTERVAL_S = 5.0
BUSY_RECHECK_S = 1.0  # how often a shard with a row another session locks is scanned again from its start
BROKER_WATCH_TIMEOUT_S = 3.0
MIGRATE_HINT = "the schema is missing or older than this version: run `kaireon-pub migrate`"

__all__ = ["TickResult", "Worker", "classify_db_error"]


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
        # A pooler that refuses the session's startup options (PgBouncer in transaction mode with
        # OUTBOX_POOL_MODE=session) will refuse them on every retry: an operator must act. So will
        # PgBouncer with auth_type=trust a user that is not in its auth_file.
        return not ("password authentication failed" in text or "does not exist" in text
                    or "no pg_hba.conf entry" in text or "unsupported startup parameter" in text
                    or '"trust" authentication failed' in text)
    if isinstance(exc, (psycopg.InterfaceError, psycopg.errors.QueryCanceled,
                        psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected,
                        psycopg.errors.LockNotAvailable)):
        return True
    return False


class _MetLockedRow(Exception):
    """The claim met a pending row another session locks (its transaction is rolled back)."""


class Worker:
    def __init__(self, settings: Settings, slot: int, worker_id: uuid.UUID,
                 heartbeat: Callable[[], None], dead_worker_ids: list[uuid.UUID]):
        self.settings = settings
        self.slot = slot
        self.worker_id = worker_id
        self.heartbeat = heartbeat
        self.dead_worker_ids = dead_worker_ids
        # The supervisor runs settings.workers of us: each takes its share from its first round.
        self.leases = Leases(worker_id, slot, settings.lease_ttl_seconds, siblings=settings.workers)
        # The keeper's statements must end well inside a renewal interval.
        keeper_timeout_ms = max(500, min(settings.statement_timeout_ms, settings.lease_ttl_seconds * 1000 // 3))
        # Behind a transaction pooler the keeper cannot LISTEN on its connection: it polls instead.
        self.keeper = LeaseKeeper(self.leases, self._connector("leases", keeper_timeout_ms), self._on_leases_changed,
                                  listen=settings.pool_mode == "session")
        self.listener = Listener(self._connector("listen"), self._on_rescan_notice)
        self.cursors: dict[int, tuple[int, int]] = {}
        self.rescan_at: dict[int, float] = {}
        # shard -> key -> (xid, id) of a pending row another session locks: the rest of its key
        # waits; the claim steps around such rows (claim_careful_*) while there are any.
        self.busy: dict[int, dict[str | None, tuple[int, int]]] = {}  # a NULL key holds nothing
        self.careful_until = 0.0
        self.locked_seen: dict[int, float] = {}  # busy event id -> last met (logged and counted once)
        self.next_full_rescan = time.monotonic() + settings.rescan_interval_ms / 1000
        self.rotation = 0
        self.stop_requested = False
        self.drain_deadline = float("inf")
        self.shards_changed = False
        self.streak = 0
        self.streak_transient = 0
        self.kafka_stalls = 0
        self.last_error_id: str | None = None
        self.probe_database_first = False
        self.claims_orphaned = False  # a claim failed on the connection: its outcome is unknown
        self.foreign_rows_checked = False  # restored rows are re-stamped before this worker's first claim
        self.passed_over: dict[int, float] = {}  # xids the horizon stopped waiting for -> when
        self.unknown_since: dict[int, float] = {}  # running xids with no visible session -> first seen
        self.unknown_passed: list[int] = []
        self.session_tag = f"worker-{slot}.{worker_id.hex[:8]}"
        self.unsettled: tuple[uuid.UUID, list[Row], BatchOutcome] | None = None
        self.pool: psycopg_pool.AsyncConnectionPool | None = None
        self.publisher: Publisher | None = None
        self.tracing: tracing.Tracing | None = None  # None unless OTEL_TRACES_EXPORTER and the otel extra
        self.cluster_id: str | None = None
        self.tasks: list[asyncio.Task] = []
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
            self.keeper.draining = True  # renew until the release, acquire nothing more
            # Leave a margin inside the supervisor's budget for marking and releasing.
            budget = self.settings.shutdown_drain_timeout_ms / 1000
            self.drain_deadline = time.monotonic() + max(0.5, budget - 2.0)

    def cut_off(self) -> float:
        """When the batch in flight must give up: the drain deadline, or shortly before the leases
        may have expired (a batch never outlives its lease)."""
        margin = min(1.0, self.settings.lease_ttl_seconds / 4)
        return min(self.drain_deadline, self.leases.valid_until - margin)

    # ---- lifecycle -----------------------------------------------------------------------------

    def _connector(self, role: str, statement_timeout_ms: int | None = None):
        settings = self.settings
        if role == "listen" and listen_url(settings) is None:
            return None  # behind a transaction pooler with no session of the server's own: polling

        async def connect() -> psycopg.AsyncConnection:
            name = f"{self.session_tag}-{role}"
            if role == "listen":
                return await listen_connector(settings, name)()
            return await async_connector(settings, name, publisher=True, statement_timeout_ms=statement_timeout_ms)()
        return connect

    async def boot(self) -> None:
        s = self.settings
        # The producer first: a bad librdkafka setting fails before any connection is opened.
        # The tracer provider is made here, after fork (its export threads do not survive one).
        self.tracing = tracing.setup(os.environ, slot=self.slot)
        self.publisher = Publisher(s, client_id=f"kaireon-pub-{self.slot}", tracing=self.tracing)
        self.pool = psycopg_pool.AsyncConnectionPool(
            s.database_url, min_size=1, max_size=4, open=False, name=f"worker-{self.slot}",
            # The session name carries the worker id, so a peer can tell this worker's sessions
            # (kaireon-pub:worker-<slot>.<id>) and end them if it freezes holding lease locks.
            kwargs={"autocommit": True, **session_options(s, self.session_tag, publisher=True)},
            # Behind a transaction pooler: a class that sets the session's settings in every transaction.
            connection_class=connection_class(s, self.session_tag, publisher=True),
            timeout=5,
        )
        await self.pool.open(wait=False)
        self.tasks.append(asyncio.create_task(self.keeper.run(), name="lease-keeper"))
        self.tasks.append(asyncio.create_task(self._broker_watch(), name="broker-watch"))
        if self.slot == 0:
            stopping = lambda: self.stop_requested  # noqa: E731
            self.tasks.append(asyncio.create_task(housekeeping.gauges_loop(s, self.pool, stopping), name="gauges"))
            if s.retention_seconds > 0:
                self.tasks.append(asyncio.create_task(
                    housekeeping.purge_loop(s, self.pool, stopping, lambda: self.last_claim_full), name="purge"))
            self.tasks.append(asyncio.create_task(housekeeping.foreign_rows_loop(s, self.pool, stopping),
                                                  name="foreign-rows"))
            from kaireon_pub.worker.partition_maintenance import partitions_loop

            # A partitioned outbox's partitions ahead and partition retention; returns at once on a plain table.
            self.tasks.append(asyncio.create_task(partitions_loop(s, self.session_tag, stopping), name="partitions"))
        # The first lease round usually takes milliseconds; do not idle a poll interval before it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.keeper.first_round.wait(), 5)

    async def _recover_dead_workers(self) -> None:
        """Rows a crashed predecessor in this slot had claimed go back to pending at once.

        Part of the tick, not of the boot: during a database outage it fails and is retried with
        the tick's back-off, instead of counting as a boot failure (exit 4 after five)."""
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
        await self.keeper.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.keeper.close()
        await self.listener.close()
        if self.pool is not None:
            try:
                if self.unsettled:
                    await self._settle_again()
                released = await self._release_shards()
                log.info("drain finished; shards released", extra={"event": "drain done", "shards": released})
            except Exception as exc:  # noqa: BLE001 - the drain must finish; the error is logged with an id
                log.error(f"drain could not release shards: {type(exc).__name__}: {exc}",
                          extra={"event": "drain failed", "errorId": new_error_id(), "isTransient": True})
            await self.pool.close(timeout=2)
        if self.publisher is not None:
            await self.publisher.close()
        if self.tracing is not None:
            # The spans of the last batches are exported within the drain budget (5 s at most).
            await self.tracing.close(min(5.0, max(0.5, self.drain_deadline - time.monotonic())))
        metrics.IN_FLIGHT.set(0)

    async def _release_shards(self) -> int:
        """Hand every shard back now, so peers take them at once instead of after the TTL: on a
        pooled connection, or on a connection of its own when the pool has none to give (its
        connections may have gone with the tasks cancelled just before)."""
        try:
            async with self.pool.connection(timeout=2) as conn:
                return await self.leases.release_all(conn)
        except psycopg_pool.PoolTimeout:
            conn = await self._connector("drain")()
            try:
                return await self.leases.release_all(conn)
            finally:
                await conn.close()

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
                    exit_code = await self._tick_failed(exc)
                    if exit_code is not None:
                        return exit_code
                    await self.wait_for_work(self._failure_backoff())
                    continue
                finally:
                    metrics.TICK_DURATION.observe(time.monotonic() - started)
                self._tick_succeeded()
                # A claim that looked at a full batch of rows it had to hold back (strict order)
                # moved its cursors past them: claim again now, the rows behind them are due.
                if result.claimed == 0 and not self.last_claim_full:
                    await self.wait_for_work(self.settings.poll_interval_ms / 1000)
            return ExitCode.OK
        finally:
            await self.shutdown()

    # ---- one tick --------------------------------------------------------------------------------

    async def tick(self) -> TickResult:
        if self.publisher.broken:
            await self._recreate_producer()
        if self.probe_database_first:
            # The last tick could not get a connection: ask the server directly, which fails at
            # once with its reason (a missing role, a wrong password) instead of a pool timeout.
            reason = await self._database_refusal()
            if reason is not None:
                raise reason
            self.probe_database_first = False
        if self.unsettled:
            await self._settle_again()
        if self.dead_worker_ids:
            await self._recover_dead_workers()
        if self.claims_orphaned:
            await self._reset_orphaned_claims()
        if not self.foreign_rows_checked:
            # Before the first claim, by every worker: rows restored from another cluster must sort
            # before the newer events of their keys before any of those is claimed.
            async with self.pool.connection() as conn:
                await housekeeping.restamp_foreign_rows(conn)
            self.foreign_rows_checked = True
        if self.cut_off() <= time.monotonic():
            # No lease that holds (the first round failed, or renewals keep failing): a round of
            # our own, whose failure is this tick's, so the streak and the exit codes see it.
            await self.keeper.attempt()
        return await self.run_once()

    async def run_once(self) -> TickResult:
        """Claim one batch of the owned shards, publish it, settle every event. O(batch)."""
        self.last_claim_full = False
        async with self.keeper.batch_lock:
            self._apply_rescans()
            shards = self._rotated_shards()
            if not shards or self.stop_requested:  # a drain stops claiming at once
                return TickResult()
            if self.cut_off() <= time.monotonic():
                return TickResult()  # the leases are about to lapse (renewals failing): claim nothing
            s = self.settings
            params = {
                "shards": int_array(shards),
                "epochs": int_array(self.leases.owned[sh] for sh in shards),
                "cursor_xids": int_array(self.cursors.get(sh, ZERO_CURSOR)[0] for sh in shards),
                "cursor_ids": int_array(self.cursors.get(sh, ZERO_CURSOR)[1] for sh in shards),
                "worker_id": self.worker_id, "relaxed": not self.strict, "batch": s.batch_size,
            }
            if s.claim_mode == "lock":
                return await self._run_once_locked(params)
            token = uuid.uuid4()
            params.update(token=token, staleness=s.reaper_staleness_seconds)
            async with self.pool.connection() as conn:
                params["horizon"] = await self._horizon(conn)
                try:
                    raw = await self._claim(conn, params)
                except (psycopg.OperationalError, psycopg.InterfaceError):
                    # The claim may have committed without its reply reaching us: its rows would sit
                    # in processing under a token we never learnt. Reset them before the next claim.
                    self.claims_orphaned = True
                    raise
            rows = self._take_claimed(raw)
            if not rows:
                return TickResult()
            outcome = await self._publish(rows)
            return await self._settle(token, rows, outcome)

    async def _claim(self, conn: psycopg.AsyncConnection, params: dict) -> list[tuple]:
        """Status mode: one claim; made again stepping around a row another session locks."""
        # Binary results: the payloads as bytes, not hex text to decode.
        if not self._careful():
            try:
                return await (await conn.execute(Q.claim_batch, params, binary=True)).fetchall()
            except psycopg.errors.LockNotAvailable:
                self._met_locked_row()
        return await (await conn.execute(Q.claim_careful_batch, self._with_busy(params), binary=True)).fetchall()

    async def _run_once_locked(self, params: dict) -> TickResult:
        """Lock mode: one transaction per batch; its row locks are the claim, one write per event."""
        async with self.pool.connection() as conn:
            params["horizon"] = await self._horizon(conn)
            careful = self._careful()
            while True:
                claim = Q.claim_careful_locked_batch if careful else Q.claim_locked_batch
                try:
                    async with conn.transaction():
                        try:
                            cur = await conn.execute(claim, self._with_busy(params) if careful else params,
                                                     binary=True)
                        except psycopg.errors.LockNotAvailable as exc:
                            if careful:
                                raise
                            raise _MetLockedRow from exc  # rolls the transaction back
                        rows = self._take_claimed(await cur.fetchall())
                        if not rows:
                            return TickResult()
                        outcome = await self._publish(rows)
                        result, retry_rows = await self._write_outcome(conn, None, rows, outcome)
                    break
                except _MetLockedRow:
                    self._met_locked_row()
                    careful = True
        self._after_settle(rows, outcome, retry_rows, result)
        return result

    # ---- rows another session locks --------------------------------------------------------------

    def _careful(self) -> bool:
        return bool(self.busy) or time.monotonic() < self.careful_until

    def _met_locked_row(self) -> None:
        metrics.CLAIM_LOCK_CONFLICTS.inc()
        # Stay careful a while: a shard rescan forgets its busy rows, then meets them again.
        self.careful_until = time.monotonic() + 3 * BUSY_RECHECK_S

    def _with_busy(self, params: dict) -> dict:
        held = [(shard, key, pos) for shard, keys in self.busy.items() for key, pos in keys.items()]
        return {**params, "busy_shards": int_array(h[0] for h in held), "busy_keys": [h[1] for h in held],
                "busy_xids": int_array(h[2][0] for h in held), "busy_ids": int_array(h[2][1] for h in held)}

    def _note_busy(self, busy_rows: list[tuple]) -> None:
        """Rows the careful claim could not lock: their keys wait, their shards are scanned again
        from the start soon (the scan meets each such row before the later rows of its key)."""
        now = time.monotonic()
        # An event met again within a few rechecks is the same lock: one line, one count.
        self.locked_seen = {i: t for i, t in self.locked_seen.items() if now - t < 5 * BUSY_RECHECK_S}
        for r in busy_rows:
            shard, key, position = r[7], r[2], (r[8], r[0])
            if r[0] not in self.locked_seen:
                log.warning("event locked by another session: the claim steps around it until the lock ends",
                            extra={"event": "event locked by another session", "eventId": r[0], "shard": shard})
                if not self.strict and key is not None:
                    metrics.ORDER_VIOLATIONS.inc()  # relaxed: its key flows on past it
            self.locked_seen[r[0]] = now
            keys = self.busy.setdefault(shard, {})
            if key not in keys or position < keys[key]:
                keys[key] = position
            self.rescan_at[shard] = min(self.rescan_at.get(shard, float("inf")), now + BUSY_RECHECK_S)
        self.careful_until = now + 3 * BUSY_RECHECK_S
        self._busy_changed()

    def _busy_changed(self) -> None:
        metrics.LOCKED_EVENTS.set(sum(len(keys) for keys in self.busy.values()))

    def _take_claimed(self, raw: list[tuple]) -> list[Row]:
        """The claimed rows of a claim's result, in per-key order; the cursors move past every row
        the claim looked at, also those it held back (a NULL topic): the cursor comes back to them
        when the event they wait for settles."""
        # Per-key order is (xid, id) within a shard; keys never span shards.
        raw.sort(key=CLAIM_ORDER)
        if raw and len(raw[0]) != ROW_FIELDS:
            raise TypeError(f"the claim returned {len(raw[0])} columns, a Row has {ROW_FIELDS}")
        rows = [_as_row(Row, r) for r in raw if r[1] is not None]
        # A row another session locks comes back like a held row, but with its attempts and key.
        busy = [r for r in raw if r[1] is None and r[6] is not None]
        if busy:
            self._note_busy(busy)
        self.last_claim_full = len(raw) >= self.settings.batch_size
        # In claim order, each shard's last row is its furthest position.
        for shard, r in {r[7]: r for r in raw}.items():
            position = (r[8], r[0])
            if position > self.cursors.get(shard, ZERO_CURSOR):
                self.cursors[shard] = position
        return rows

    async def _horizon(self, conn: psycopg.AsyncConnection) -> str:
        """The claim horizon now; remembers the transactions it stopped waiting for, and rescans
        from the xid of each of those that has ended since."""
        now = time.monotonic()
        wait_s = self.settings.horizon_max_wait_ms / 1000
        pass_over = self.unknown_passed = [x for x, seen in self.unknown_since.items() if now - seen >= wait_s]
        cur = await conn.execute(Q.claim_horizon, {"max_wait_ms": self.settings.horizon_max_wait_ms,
                                                   "remembered": list(self.passed_over), "pass_over": pass_over})
        horizon, held_for, bypassed, unknown, ended = await cur.fetchone()
        # Xids whose session the tier cannot see are timed here, from when they were first seen.
        self.unknown_since = {x: self.unknown_since.get(x, now) for x in unknown}
        metrics.HORIZON_AGE.set(max(0.0, held_for or 0.0))
        for xid in ended:
            # Its rows (if it committed any) sit behind the cursors: look again from its xid.
            self.passed_over.pop(xid, None)
            for shard in list(self.cursors):
                self._rewind(shard, (xid, 0))
        fresh = [xid for xid in bypassed if xid not in self.passed_over]
        if fresh:
            await self._passed_over_now(conn, fresh)
        return str(horizon)

    async def _passed_over_now(self, conn: psycopg.AsyncConnection, xids: list[int]) -> None:
        if len(self.passed_over) + len(xids) > MAX_PASSED_OVER:
            # Too many to track one by one: a full rescan of every shard finds their rows.
            self.passed_over.clear()
            self.next_full_rescan = time.monotonic()
        now = time.monotonic()
        for xid in xids:
            self.passed_over[xid] = now
        metrics.HORIZON_BYPASSED.inc(len(xids))
        cur = await conn.execute(Q.horizon_holders, {"max_wait_ms": self.settings.horizon_max_wait_ms,
                                                     "pass_over": self.unknown_passed})
        holders = [h for h in await cur.fetchall() if h[4]]
        for pid, gid, database, application, _bypassed, age in holders[:5]:
            log.warning("the claim stopped waiting for a transaction open longer than OUTBOX_HORIZON_MAX_WAIT_MS; "
                        "its rows are published when it ends", extra={
                            "event": "horizon bypass", "xids": xids, "holderPid": pid, "holderGid": gid,
                            "database": database, "application": application,
                            "ageSeconds": round(age or 0.0, 1)})

    async def _reset_orphaned_claims(self) -> None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(Q.reset_own_claims, {"worker_id": self.worker_id})
            reset = (await cur.fetchone())[0]
        self.claims_orphaned = False
        if reset:
            self.cursors.clear()  # they are back in pending, behind the cursors
            log.warning("reset this worker's rows left in processing by a claim whose reply was lost",
                        extra={"event": "orphaned claims reset", "count": reset, "errorId": self.last_error_id})

    async def _publish(self, rows: list[Row]) -> BatchOutcome:
        metrics.IN_FLIGHT.inc(len(rows))
        try:
            deadline = time.monotonic() + self.settings.message_timeout_ms / 1000 + 1.0
            try:
                return await self.publisher.publish(rows, self.strict, deadline, self.cut_off)
            except Exception as exc:  # noqa: BLE001 - never leave claimed rows behind
                reason = f"publish raised {type(exc).__name__}: {exc}"
                self.publisher.mark_broken(reason, "exception")
                return BatchOutcome(released=[r.id for r in rows], producer_error=reason, unconfirmed=len(rows))
        finally:
            metrics.IN_FLIGHT.dec(len(rows))

    # ---- settling a batch ------------------------------------------------------------------------

    async def _write_outcome(self, conn: psycopg.AsyncConnection, token: uuid.UUID | None,
                             rows: list[Row], outcome: BatchOutcome) -> tuple[TickResult, list[tuple]]:
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
            cur = await conn.execute(query, {"ids": int_array(outcome.delivered), "token": token})
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
            await conn.execute(Q.release_claimed, {"ids": int_array(outcome.released), "token": token})
        return result, retry_rows

    async def _settle(self, token: uuid.UUID, rows: list[Row], outcome: BatchOutcome) -> TickResult:
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

    def _after_settle(self, rows: list[Row], outcome: BatchOutcome, retry_rows: list[tuple],
                      result: TickResult) -> None:
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
        if outcome.released:
            by_id = {r.id: r for r in rows}
            for event_id in outcome.released:
                row = by_id[event_id]
                self._rewind(row.shard, (row.xid, row.id - 1))
        rejected = outcome.rejected
        for row in rows:
            # Settled after a retry, or rejected now: later events of its key may be waiting.
            if row.attempts > 0 or row.id in rejected:
                self._rewind(row.shard, row.position)
        result.released = len(outcome.released)
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
        # A producer whose batches keep timing out while nothing is delivered may be wedged on
        # a broker that came back without its idempotence state: start afresh after two.
        self.kafka_stalls = self.kafka_stalls + 1 if outcome.transient_error and not outcome.delivered else 0
        if self.kafka_stalls >= 2 and not outcome.producer_error:
            self.kafka_stalls = 0
            self.publisher.mark_broken(f"two batches in a row undelivered: {outcome.transient_error}", "stalled")
        if outcome.producer_error:
            if not self.publisher.broken:
                self.publisher.mark_broken(outcome.producer_error, "producer")
            raise TransientError(f"producer must be recreated: {outcome.producer_error}")
        if outcome.systemic_error:
            raise SystemicError(outcome.systemic_error)
        if outcome.transient_error:
            raise TransientError(outcome.transient_error)

    async def _recreate_producer(self) -> None:
        reason, cause = self.publisher.broken, self.publisher.broken_cause or "producer"
        metrics.PRODUCER_RECREATED.labels(cause).inc()
        log.warning(f"producer recreated: {reason}", extra={
            "event": "producer recreated", "reason": reason, "cause": cause,
            "errorId": self.last_error_id or new_error_id()})
        self.kafka_stalls = 0
        await self.publisher.recreate()

    # ---- the broker watch -------------------------------------------------------------------------

    async def _broker_watch(self) -> None:
        """The cluster id behind the bootstrap address, every few seconds: a different cluster (a
        broker replaced, a disaster-recovery switch) gets a new producer, and whatever was in
        flight is treated as unconfirmed and published again."""
        while not self.stop_requested:
            try:
                cluster_id = await asyncio.to_thread(self.publisher.fetch_cluster_id, BROKER_WATCH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - an unreachable broker is reported by librdkafka's lines
                cluster_id = None
                if self.slot == 0:
                    metrics.BROKER_UP.set(0)
            else:
                if self.slot == 0:
                    metrics.BROKER_UP.set(1)
            if cluster_id:
                if self.cluster_id is not None and cluster_id != self.cluster_id:
                    log.warning("the broker's cluster id changed; recreating the producer", extra={
                        "event": "cluster changed", "previousClusterId": self.cluster_id,
                        "clusterId": cluster_id, "errorId": new_error_id()})
                    self.publisher.mark_broken(f"cluster id changed from {self.cluster_id} to {cluster_id}",
                                          "cluster_changed")
                self.cluster_id = cluster_id
            await asyncio.sleep(BROKER_WATCH_INTERVAL_S)

    # ---- cursors and shards ----------------------------------------------------------------------

    def _rewind(self, shard: int, position: tuple[int, int]) -> None:
        if shard in self.cursors and position < self.cursors[shard]:
            self.cursors[shard] = position

    def _apply_rescans(self) -> None:
        now = time.monotonic()
        if now >= self.next_full_rescan:
            self.cursors.clear()
            self.rescan_at.clear()
            self._forget_busy(list(self.busy))
            self.next_full_rescan = now + self.settings.rescan_interval_ms / 1000
            return
        for shard in [sh for sh, at in self.rescan_at.items() if at <= now]:
            self.cursors.pop(shard, None)
            del self.rescan_at[shard]
            self._forget_busy([shard])

    def _forget_busy(self, shards: list[int]) -> None:
        """Its cursor back at the start, a shard's scan meets its busy rows again before the later
        rows of their keys: the claim learns afresh whether they are still locked."""
        forgot = [shard for shard in shards if self.busy.pop(shard, None) is not None]
        if forgot:
            self._busy_changed()

    def _rotated_shards(self) -> list[int]:
        shards = sorted(self.leases.owned)
        if not shards:
            return []
        self.rotation = (self.rotation + 1) % len(shards)
        return shards[self.rotation:] + shards[:self.rotation]

    def _on_leases_changed(self, result: RebalanceResult) -> None:
        for shard in result.acquired:
            self.cursors.pop(shard, None)
        for shard in result.released + result.lost:
            self.cursors.pop(shard, None)
            self.rescan_at.pop(shard, None)
        self._forget_busy(result.acquired + result.released + result.lost)
        if result.acquired:
            self.shards_changed = True

    def _on_rescan_notice(self) -> None:
        self.cursors.clear()
        self._forget_busy(list(self.busy))

    # ---- waiting ---------------------------------------------------------------------------------

    async def wait_for_work(self, timeout: float) -> None:
        """Sleep until NOTIFY (enqueue commits), new shards, a stop, or `timeout`; heartbeat at
        least every second."""
        deadline = time.monotonic() + timeout
        while not self.stop_requested:
            if self.shards_changed:
                self.shards_changed = False
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.heartbeat()
            if await self.listener.wait(min(1.0, remaining)):
                return

    # ---- failure accounting ------------------------------------------------------------------------

    async def _database_refusal(self) -> BaseException | None:
        """The server's own reason for refusing a connection, or None when it accepts one."""
        try:
            conn = await self._connector("probe")()
        except psycopg.Error as exc:
            return exc
        await conn.close()
        return None

    async def _tick_failed(self, exc: BaseException) -> int | None:
        if isinstance(exc, psycopg_pool.PoolTimeout):
            # The pool only says it got no connection in time; the server says why.
            self.probe_database_first = True
            exc = await self._database_refusal() or exc
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
        extra = {"event": "tick failed", "errorId": error_id, "isTransient": transient,
                 "error": f"{type(exc).__name__}: {str(exc).strip()}", "consecutiveFailures": self.streak}
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn
                      | psycopg.errors.UndefinedFunction):
            extra["hint"] = MIGRATE_HINT
        log.error(
            "outbox-publisher tick failed",
            exc_info=exc if not isinstance(exc, TransientError | SystemicError | psycopg.Error
                                           | psycopg_pool.PoolTimeout) else None,
            extra=extra,
        )
        if self.streak >= self.settings.max_consecutive_failures:
            log.critical(
                f"{self.streak} consecutive non-transient failures; exiting with code 3",
                extra={"event": "giving up", "errorId": error_id, "isTransient": False,
                       **({"hint": extra["hint"]} if "hint" in extra else {})},
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
