"""Shard leases: every live worker of every replica takes about shards / live workers.

PostgreSQL is the coordinator. A worker registers itself with an expiry (database clock), renews
the leases it holds, releases what is above its fair share, and takes free or expired shards up
to it, bumping each shard's fencing epoch. On taking a shard, rows a previous owner left in
`processing` go back to `pending` (their tokens cleared, so the old owner's mark cannot land).

The `LeaseKeeper` does this on its own clock and its own connection, beside the claim loop: a
batch that waits for a slow broker, or a failure back-off, never delays a renewal. Renewing and
taking shards need nothing from the loop; giving shards away waits until no batch is in flight
(the loop holds `batch_lock` from claim to settle), so a shard is never released under a claim.

Full speed from the first claim:
- a worker of a supervisor that runs N workers counts at least N live workers during its first
  lease period, so worker k of N takes its share of the free shards in its first round instead of
  the first one to register taking all 256 until the next rebalance (its siblings register within
  milliseconds; one that never comes stops counting once the period is over);
- a worker's first registration, a release (rebalance or drain) and leaving the tier NOTIFY
  `kaireon_outbox_leases` on commit; every keeper LISTENs on its own connection between rounds
  and runs a round at once when another worker's notification arrives, so a joining worker or
  replica is given its share, and a leaving one's shards are taken, within milliseconds rather
  than at the next renewal. A keeper that cannot LISTEN (its connection goes through a
  transaction pooler) polls `lease_census` (live workers, free shards: read-only) every
  CENSUS_POLL_S instead and runs a round when the tier changed.
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
CHANNEL_LEASES = "kaireon_outbox_leases"  # a worker joined, left, or released shards
WAIT_SLICE_S = 0.25  # between rounds: the longest a poke, a stop or a tick's round waits for the keeper
CENSUS_POLL_S = 0.25  # without LISTEN: how often the keeper looks whether the tier changed


@dataclass
class RebalanceResult:
    live_workers: int
    acquired: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    reset_rows: int = 0


class Leases:
    """What this worker owns, and the SQL that changes it."""

    def __init__(self, worker_id: uuid.UUID, slot: int, ttl_seconds: int, siblings: int = 1):
        self.worker_id = worker_id
        self.slot = slot
        self.ttl = ttl_seconds
        # Workers of this worker's own supervisor (OUTBOX_WORKERS), counted as live during the
        # first lease period even before they have registered.
        self.siblings = max(1, siblings)
        self.owned: dict[int, int] = {}  # shard -> epoch
        # Monotonic time until which the owned leases certainly hold: the start of the last
        # successful renewal plus the TTL (the database's expiry is at least that late).
        self.valid_until = 0.0
        self.counting_siblings_until: float | None = None  # set by the first renewal

    def counted(self, live: int) -> int:
        """Live workers as the fair share counts them: the registered ones, and during the first
        lease period at least this worker's supervisor's own."""
        until = self.counting_siblings_until
        if until is not None and time.monotonic() < until:
            return max(live, self.siblings)
        return max(1, live)

    def fair_share(self, live: int) -> int:
        return math.ceil(SHARDS / self.counted(live))

    async def renew(self, conn: psycopg.AsyncConnection) -> RebalanceResult:
        """Register and renew; shards whose lease expired before this renewal are lost. A worker
        that was not registered (its first round, or its registration may have lapsed) tells the
        other keepers, which rebalance at once."""
        started = time.monotonic()
        if self.counting_siblings_until is None:
            self.counting_siblings_until = started + self.ttl
        joining = started >= self.valid_until
        async with conn.transaction():
            cur = await conn.execute(Q.register_worker, {
                "worker_id": self.worker_id, "hostname": socket.gethostname()[:200],
                "pid": os.getpid(), "slot": self.slot, "ttl": self.ttl,
            })
            live = int((await cur.fetchone())[0])
            cur = await conn.execute(Q.renew_leases, {"worker_id": self.worker_id, "ttl": self.ttl})
            renewed = {int(shard): int(epoch) for shard, epoch in await cur.fetchall()}
            if joining:
                await conn.execute(Q.notify_leases)
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
            await conn.execute(Q.notify_leases)  # the others take the shards now, not at their next round
        self.owned.clear()
        return len(shards)


class LeaseKeeper:
    """The task that keeps the leases: renew every TTL/3, rebalance to the fair share, and at once
    when another worker joins, leaves or releases shards (LISTEN, or a polled census)."""

    def __init__(self, leases: Leases, connect: Callable[[], Awaitable[psycopg.AsyncConnection]],
                 on_change: Callable[[RebalanceResult], None], *, listen: bool = True):
        self.leases = leases
        self.connect = connect
        self.on_change = on_change
        self.listen = listen  # False behind a transaction pooler: poll the census instead
        self.listening = False  # LISTEN is active on self.conn
        self.census: tuple[int, int] | None = None  # (live workers, free shards) at the last look
        self.batch_lock = asyncio.Lock()
        self.conn: psycopg.AsyncConnection | None = None
        self.first_round = asyncio.Event()  # set after the first round, successful or not
        self.stopped = False
        # The worker is draining: keep renewing what it holds until it releases it, take nothing
        # more (a peer's drain releases shards and notifies; a draining worker would only have to
        # hand them back again).
        self.draining = False
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
            await self._wait(max(started + pause, time.monotonic() + 0.05))

    async def _wait(self, deadline: float) -> None:
        """Until the next round is due: the deadline, a poke, a stop, or the tier changing (another
        keeper's notification, or a census that differs from the last round's)."""
        while not self.stopped and not self._poke.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.listening:
                if await self._notified(min(remaining, WAIT_SLICE_S)):
                    return
                continue
            try:
                await asyncio.wait_for(self._poke.wait(), min(remaining, CENSUS_POLL_S))
                return
            except TimeoutError:
                pass
            if not self.listen and await self._tier_changed():
                return

    async def _notified(self, timeout: float) -> bool:
        """Another worker's notification within `timeout` (this session's own are ignored)."""
        deadline = time.monotonic() + timeout
        async with self._round_lock:  # a tick's own round waits at most one slice
            if not self.listening:
                return False  # the connection was dropped meanwhile
            try:
                own = self.conn.info.backend_pid
                while (remaining := deadline - time.monotonic()) > 0:
                    heard = False
                    # stop_after ends the generator by itself, so the connection's lock is released.
                    async for note in self.conn.notifies(timeout=remaining, stop_after=1):
                        heard = heard or note.pid != own
                    if heard:
                        return True
            except (psycopg.Error, OSError):
                # Broken between rounds: a round now reconnects (and reports if it cannot).
                await self._drop_connection()
                return True
            return False

    async def _tier_changed(self) -> bool:
        """The polled fallback: live workers changed, or shards are free while this worker is below
        its fair share."""
        async with self._round_lock:
            if self.conn is None or self.conn.closed:
                return False
            try:
                cur = await self.conn.execute(Q.lease_census)
                live, free = (int(v) for v in await cur.fetchone())
            except (psycopg.Error, OSError):
                await self._drop_connection()
                return True
        last, self.census = self.census, (live, free)
        below = len(self.leases.owned) < self.leases.fair_share(live)
        return last is None or live != last[0] or (below and free > 0 and free != last[1])

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
            self.listening = False
        if self.listen and not self.listening:
            await self.conn.execute(f"LISTEN {CHANNEL_LEASES}")
            self.listening = True
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
        elif len(leases.owned) < fair and not self.draining:
            wanted = fair - len(leases.owned)
            result.acquired, result.reset_rows = await leases.acquire(self.conn, wanted)
            if len(result.acquired) < wanted:
                await self._end_frozen_owners()
        self._report(result)
        self.census = (result.live_workers, self.census[1] if self.census else 0)
        return len(leases.owned) < SHARDS // leases.counted(result.live_workers)

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

    async def _drop_connection(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close()
            except Exception:  # noqa: BLE001, S110 - a broken connection is dropped whatever it says
                pass
        self.conn = None
        self.listening = False

    async def close(self) -> None:
        await self._drop_connection()
