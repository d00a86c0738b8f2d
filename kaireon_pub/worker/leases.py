"""Shard leases: every live worker of every replica takes about shards / live workers.

PostgreSQL is the coordinator. A worker registers itself with an expiry (database clock), renews
the leases it holds, releases what is above its fair share, and takes free or expired shards up
to it, bumping each shard's fencing epoch. On taking a shard, rows a previous owner left in
`processing` go back to `pending` (their tokens cleared, so the old owner's mark cannot land).

The `LeaseKeeper` does this on its own clock and its own connection, beside the claim loop: a
batch that waits for a slow broker, or a failure back-off, never delays a renewal. Renewing and
taking shards need nothing from the loop; giving shards away waits until no batch is in flight
(the loop holds `batch_lock` from claim to settle), so a shard is never released under a claim.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import psycopg

from kaireon_pub import metrics
from kaireon_pub.db.queries import Q
from kaireon_pub.errors import new_error_id

log = logging.getLogger("kaireon_pub.worker.leases")

SHARDS = 256


@dataclass
class RebalanceResult:
    live_workers: int
    acquired: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    reset_rows: int = 0


class Leases:
    """What this worker owns, and the SQL that changes it."""

    def __init__(self, worker_id: uuid.UUID, slot: int, ttl_seconds: int):
        self.worker_id = worker_id
        self.slot = slot
        self.ttl = ttl_seconds
        self.owned: dict[int, int] = {}  # shard -> epoch
        # Monotonic time until which the owned leases certainly hold: the start of the last
        # successful renewal plus the TTL (the database's expiry is at least that late).
        self.valid_until = 0.0

    def fair_share(self, live: int) -> int:
        return math.ceil(SHARDS / max(1, live))

    async def renew(self, conn: psycopg.AsyncConnection) -> RebalanceResult:
        """Register and renew; shards whose lease expired before this renewal are lost."""
        started = time.monotonic()
        async with conn.transaction():
            cur = await conn.execute(Q.register_worker, {
                "worker_id": self.worker_id, "hostname": socket.gethostname()[:200],
                "pid": os.getpid(), "slot": self.slot, "ttl": self.ttl,
            })
            live = int((await cur.fetchone())[0])
            cur = await conn.execute(Q.renew_leases, {"worker_id": self.worker_id, "ttl": self.ttl})
            renewed = {int(shard): int(epoch) for shard, epoch in await cur.fetchall()}
        result = RebalanceResult(live_workers=live)
        result.lost = sorted(set(self.owned) - set(renewed))
        self.owned = {s: e for s, e in renewed.items() if self.owned.get(s, e) == e}
        self.valid_until = started + self.ttl
        return result

    async def release(self, conn: psycopg.AsyncConnection, shards: list[int]) -> list[int]:
        cur = await conn.execute(Q.release_leases, {"worker_id": self.worker_id, "shards": shards})
        released = sorted(int(r[0]) for r in await cur.fetchall())
        for shard in shards:
            self.owned.pop(shard, None)
        return released

    async def acquire(self, conn: psycopg.AsyncConnection, n: int) -> tuple[list[int], int]:
        async with conn.transaction():
            cur = await conn.execute(Q.acquire_leases, {"worker_id": self.worker_id, "n": n, "ttl": self.ttl})
            taken = {int(shard): int(epoch) for shard, epoch in await cur.fetchall()}
            reset = 0
            if taken:
                cur = await conn.execute(Q.reset_shard_claims, {"worker_id": self.worker_id, "shards": sorted(taken)})
                reset = int((await cur.fetchone())[0])
        self.owned.update(taken)
        return sorted(taken), reset

    async def release_all(self, conn: psycopg.AsyncConnection) -> int:
        """Drain: hand every shard back at once, and leave the tier."""
        shards = sorted(self.owned)
        async with conn.transaction():
            if shards:
                await conn.execute(Q.release_leases, {"worker_id": self.worker_id, "shards": shards})
            await conn.execute(Q.unregister_worker, {"worker_id": self.worker_id})
        self.owned.clear()
        return len(shards)


class LeaseKeeper:
    """The task that keeps the leases: renew every TTL/3, rebalance to the fair share."""

    def __init__(self, leases: Leases, connect: Callable[[], Awaitable[psycopg.AsyncConnection]],
                 on_change: Callable[[RebalanceResult], None]):
        self.leases = leases
        self.connect = connect
        self.on_change = on_change
        self.batch_lock = asyncio.Lock()
        self.conn: psycopg.AsyncConnection | None = None
        self.first_round = asyncio.Event()  # set after the first round, successful or not
        self.stopped = False
        self._poke = asyncio.Event()
        self._round_lock = asyncio.Lock()

    def poke(self) -> None:
        """Rebalance now (a peer left, the loop saw its shards change)."""
        self._poke.set()

    async def run(self) -> None:
        interval = self.leases.ttl / 3
        while not self.stopped:
            started = time.monotonic()
            below = False
            try:
                below = await self.attempt(until=started + interval)
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried on the next round
                metrics.LEASE_RENEWAL_FAILURES.inc()
                log.warning(f"lease renewal failed: {type(exc).__name__}: {exc}", extra={
                    "event": "lease renewal failed", "errorId": new_error_id(), "isTransient": True,
                    "leasesValidForSeconds": round(max(0.0, self.leases.valid_until - time.monotonic()), 2)})
            finally:
                self.first_round.set()
            # Below the fair share (a peer is handing shards over): look again soon.
            pause = min(interval, 0.5) if below else interval
            self._poke.clear()
            try:
                await asyncio.wait_for(self._poke.wait(), max(0.05, started + pause - time.monotonic()))
            except TimeoutError:
                pass

    async def attempt(self, until: float | None = None) -> bool:
        """One round now, whoever asks (the keeper's clock, or a tick that holds no valid lease and
        needs the database's answer); a failure raises, for the caller to classify."""
        async with self._round_lock:
            try:
                return await self.round(until if until is not None else time.monotonic() + self.leases.ttl / 3)
            except Exception:
                await self._drop_connection()
                raise

    async def round(self, until: float) -> bool:
        """One renewal and rebalance; True when this worker is below its fair share."""
        if self.conn is None or self.conn.closed:
            self.conn = await self.connect()
        leases = self.leases
        result = await leases.renew(self.conn)
        if result.lost:
            metrics.LEASE_RENEWAL_FAILURES.inc()
            log.warning("leases expired before renewal", extra={"event": "lease expired", "shards": result.lost})
        fair = leases.fair_share(result.live_workers)
        if len(leases.owned) > fair:
            # Give back the highest shards (the others keep their cursors), between batches only;
            # if a batch is in flight past this round, the next round tries again.
            try:
                await asyncio.wait_for(self.batch_lock.acquire(), max(0.0, until - time.monotonic()))
            except TimeoutError:
                pass
            else:
                try:
                    extra = sorted(leases.owned)[fair - len(leases.owned):]
                    result.released = await leases.release(self.conn, extra)
                finally:
                    self.batch_lock.release()
        elif len(leases.owned) < fair:
            wanted = fair - len(leases.owned)
            result.acquired, result.reset_rows = await leases.acquire(self.conn, wanted)
            if len(result.acquired) < wanted:
                await self._end_frozen_owners()
        self._report(result)
        return len(leases.owned) < SHARDS // max(1, result.live_workers)

    async def _end_frozen_owners(self) -> None:
        """Shards this worker wants may be pinned by a frozen owner's lease locks: end those
        sessions (the next round takes the shards)."""
        cur = await self.conn.execute(Q.terminate_frozen_owners, {"worker_id": self.leases.worker_id})
        ended = [(pid, name) for pid, name, terminated in await cur.fetchall() if terminated]
        if ended:
            metrics.FROZEN_OWNERS_TERMINATED.inc(len(ended))
            log.warning("ended the sessions of an expired owner that still held lease locks (frozen mid-claim)",
                        extra={"event": "frozen owner terminated", "pids": [p for p, _ in ended],
                               "sessions": [n for _, n in ended]})
            self.poke()

    def _report(self, result: RebalanceResult) -> None:
        if result.acquired:
            metrics.HANDOVERS.labels("acquired").inc(len(result.acquired))
        if result.released:
            metrics.HANDOVERS.labels("released").inc(len(result.released))
        if result.acquired or result.released or result.lost:
            log.info("shard ownership changed", extra={
                "event": "rebalance", "liveWorkers": result.live_workers, "owned": len(self.leases.owned),
                "acquired": len(result.acquired), "released": len(result.released),
                "lost": len(result.lost), "resetRows": result.reset_rows})
        metrics.SHARDS_OWNED.labels(str(self.leases.slot)).set(len(self.leases.owned))
        self.on_change(result)

    async def stop(self) -> None:
        self.stopped = True
        self._poke.set()

    async def release_all(self) -> int:
        """Drain: hand every shard back and leave (on the keeper's connection, or a new one)."""
        if self.conn is None or self.conn.closed:
            self.conn = await self.connect()
        return await self.leases.release_all(self.conn)

    async def _drop_connection(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close()
            except Exception:  # noqa: BLE001, S110 - a broken connection is dropped whatever it says
                pass
        self.conn = None

    async def close(self) -> None:
        await self._drop_connection()
