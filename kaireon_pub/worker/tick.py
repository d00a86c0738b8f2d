"""One tick: the preflight recoveries, in order, then one claim -> publish -> settle cycle.

Each recovery runs when it is due and fails as the tick's failure (classified by the failure
streak, retried with the tick's back-off): a database outage never counts as a boot failure.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple

import psycopg

from kaireon_pub import metrics
from kaireon_pub.db.queries import Q
from kaireon_pub.worker import housekeeping
from kaireon_pub.worker.claim import MetLockedRow, claim_params
from kaireon_pub.worker.kafka.outcome import BatchOutcome
from kaireon_pub.worker.rows import Row, TickResult

if TYPE_CHECKING:
    from kaireon_pub.worker.loop import Worker

log = logging.getLogger("kaireon_pub.worker")


class Recovery(NamedTuple):
    name: str
    due: Callable[[], object]
    run: Callable[[], Awaitable[object]]


class Tick:
    def __init__(self, worker: Worker, dead_worker_ids: list[uuid.UUID]):
        self.w = worker
        self.dead_worker_ids = dead_worker_ids
        self.claimed_epochs: dict[int, int] = {}  # shard -> lease epoch, when the batch in flight was claimed
        self.foreign_rows_checked = False  # restored rows are re-stamped before this worker's first claim
        w = worker
        self.recoveries = [
            Recovery("producer", lambda: w.publisher.broken, lambda: w.health.recreate(w.streak.last_error_id)),
            # The last tick could not get a connection: ask the server directly, which fails at
            # once with its reason (a missing role, a wrong password) instead of a pool timeout.
            Recovery("database probe", lambda: w.streak.probe_database_first, w.streak.probe_database),
            Recovery("unsettled batch", lambda: w.settler.unsettled,
                     lambda: w.settler.settle_again(w.pool, w.streak.last_error_id)),
            Recovery("crash recovery", lambda: self.dead_worker_ids, self._recover_dead_workers),
            Recovery("orphaned claims", lambda: w.claimer.orphans, self._reset_orphaned_claims),
            # Before the first claim, by every worker: rows restored from another cluster must sort
            # before the newer events of their keys before any of those is claimed.
            Recovery("foreign rows", lambda: not self.foreign_rows_checked, self._restamp_foreign_rows),
            # No lease that holds (the first round failed, or renewals keep failing): a round of
            # our own, whose failure is this tick's, so the streak and the exit codes see it.
            Recovery("lease round", lambda: w.cut_off() <= time.monotonic(), w.keeper.attempt),
        ]

    async def run(self) -> TickResult:
        for recovery in self.recoveries:
            if recovery.due():
                await recovery.run()
        return await self.run_once()

    # ---- the recoveries ----------------------------------------------------------------------------

    async def _recover_dead_workers(self) -> None:
        """Rows a crashed predecessor in this slot had claimed go back to pending at once.

        Part of the tick, not of the boot: during a database outage it fails and is retried with
        the tick's back-off, instead of counting as a boot failure (exit 4 after five)."""
        async with self.w.pool.connection() as conn:
            cur = await conn.execute(Q.reset_worker_claims, {"worker_ids": self.dead_worker_ids})
            reset, released = await cur.fetchone()
            if reset:
                await conn.execute(Q.notify_rescan)
        log.info("recovered a crashed worker's claims", extra={
            "event": "crash recovery", "resetCount": reset, "releasedShards": released,
            "deadWorkers": [str(w) for w in self.dead_worker_ids]})
        self.dead_worker_ids = []

    async def _reset_orphaned_claims(self) -> None:
        """Before every claim while a claim cut off from this worker may still commit (claim.py)."""
        orphans = self.w.claimer.orphans
        async with self.w.pool.connection() as conn:
            reset = await orphans.reset(conn, self.w.worker_id)
        if reset:
            self.w.scan.forget_cursors()  # they are back in pending, behind the cursors
            log.warning("reset this worker's rows left in processing by a claim whose reply was lost",
                        extra={"event": "orphaned claims reset", "count": reset, "stillRunning": len(orphans.claims),
                               "errorId": self.w.streak.last_error_id})

    async def _restamp_foreign_rows(self) -> None:
        async with self.w.pool.connection() as conn:
            await housekeeping.restamp_foreign_rows(conn)
        self.foreign_rows_checked = True

    def shards_lost_since_claim(self, rows: list[Row]) -> list[int]:
        """The batch's shards this worker no longer holds under the epoch it claimed them with."""
        owned, claimed = self.w.leases.owned, self.claimed_epochs
        return sorted({r.shard for r in rows if owned.get(r.shard) != claimed.get(r.shard)})

    # ---- one cycle -------------------------------------------------------------------------------

    async def run_once(self) -> TickResult:
        """Claim one batch of the owned shards, publish it, settle every event. O(batch)."""
        w = self.w
        w.scan.last_claim_full = False
        # A busy worker never waits for work: the rescan notices are taken in before each claim.
        await w.listener.take_notices()
        async with w.keeper.batch_lock:
            w.scan.apply_rescans()
            shards = w.scan.rotated(w.leases.owned)
            if not shards or w.stop_requested:  # a drain stops claiming at once
                return TickResult()
            if w.cut_off() <= time.monotonic():
                return TickResult()  # the leases are about to lapse (renewals failing): claim nothing
            # One snapshot: the epochs the claim fences with are those the hand-over checks.
            self.claimed_epochs = {s: w.leases.owned[s] for s in shards}
            params = claim_params(w.settings, w.scan, shards, self.claimed_epochs, w.worker_id)
            if w.settings.claim_mode == "lock":
                return await self._run_once_locked(params, shards)
            token = uuid.uuid4()
            params.update(token=token, staleness=w.settings.reaper_staleness_seconds)
            async with w.pool.connection() as conn:
                await self._read_horizon(conn, params, shards)
                # A claim cut off may commit without its reply reaching us: its rows would sit in
                # processing under a token we never learnt. Remembered, and reset before each claim.
                raw = await w.claimer.claim(conn, params)
            rows = w.scan.take_claimed(raw)
            if not rows:
                return TickResult()
            outcome = await self._publish(rows)
            return await w.settler.settle(w.pool, token, rows, outcome)

    async def _read_horizon(self, conn: psycopg.AsyncConnection, params: dict, shards: list[int]) -> None:
        """The claim's horizon (restored rows of its shards re-stamped); the cursors again if it moved them."""
        params["horizon"] = await self.w.horizon.read(conn, shards)
        if self.w.horizon.rewound:
            params.update(self.w.scan.cursor_params(shards))

    async def _run_once_locked(self, params: dict, shards: list[int]) -> TickResult:
        """Lock mode: one transaction per batch; its row locks are the claim, one write per event."""
        w = self.w
        async with w.pool.connection() as conn:
            await self._read_horizon(conn, params, shards)
            careful = w.scan.careful()
            while True:
                try:
                    async with conn.transaction():
                        rows = w.scan.take_claimed(await w.claimer.claim_locked(conn, params, careful))
                        if not rows:
                            return TickResult()
                        outcome = await self._publish(rows)
                        result, retry_rows = await w.settler.write_outcome(conn, None, rows, outcome)
                    break
                except MetLockedRow:
                    w.scan.met_locked_row()
                    careful = True
        w.settler.after_settle(rows, outcome, retry_rows, result)
        return result

    async def _publish(self, rows: list[Row]) -> BatchOutcome:
        w = self.w
        metrics.IN_FLIGHT.inc(len(rows))
        try:
            deadline = time.monotonic() + w.settings.message_timeout_ms / 1000 + 1.0
            try:
                await w.publisher.warm_up(rows, min(deadline, w.cut_off()))  # a new topic's metadata, once
                lost = self.shards_lost_since_claim(rows)
                if lost:
                    # A pause past the lease (SIGSTOP, a stalled node), then a renewal that found these
                    # shards taken: their next owner may publish these rows already. The cut-off cannot
                    # see it, the renewal moved it on. Nothing was handed over: release, no copy.
                    return BatchOutcome(released=[r.id for r in rows], transient_error=(
                        f"shards {lost} were taken by another worker before the batch was handed over"))
                return await w.publisher.publish(rows, w.scan.strict, deadline, w.cut_off)
            except Exception as exc:  # noqa: BLE001 - never leave claimed rows behind
                reason = f"publish raised {type(exc).__name__}: {exc}"
                w.publisher.mark_broken(reason, "exception")
                return BatchOutcome(released=[r.id for r in rows], producer_error=reason, unconfirmed=len(rows))
        finally:
            metrics.IN_FLIGHT.dec(len(rows))
