"""The lease keeper: the task that renews this worker's leases and rebalances, on its own clock
and its own connection, beside the claim loop (the leases themselves and their SQL: leases.py).

It renews every TTL/3, rebalances to the fair share, and runs a round at once when another worker
joins, leaves or releases shards (worker 0 also deletes, every FORGET_INTERVAL_S, the registrations
of workers gone for an hour): it LISTENs on `kaireon_outbox_leases` between rounds, or, behind
a transaction pooler, polls `lease_census` every CENSUS_POLL_S. Giving shards away waits until no
batch is in flight (the loop holds `batch_lock` from claim to settle).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg

from kaireon_pub import metrics
from kaireon_pub.db.queries import Q
from kaireon_pub.errors import new_error_id
from kaireon_pub.worker.leases import Leases, RebalanceResult

log = logging.getLogger("kaireon_pub.worker.leases")

CHANNEL_LEASES = "kaireon_outbox_leases"  # a worker joined, left, or released shards
WAIT_SLICE_S = 0.25  # between rounds: the longest a poke, a stop or a tick's round waits for the keeper
CENSUS_POLL_S = 0.25  # without LISTEN: how often the keeper looks whether the tier changed
# How often worker 0 of each replica deletes the registrations of workers gone for an hour (killed,
# OOM, a lost node: only a drain unregisters). Left, they would pile up one per such exit, and every
# renewal and census counts live workers over the whole table.
FORGET_INTERVAL_S = 600.0


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
        self.forget_due = 0.0  # monotonic: worker 0's next forget_dead_workers (its first round)

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
            if len(result.acquired) < wanted and await self._shards_left_free():
                await self._end_frozen_owners()
        self._report(result)
        self.census = (result.live_workers, self.census[1] if self.census else 0)
        if leases.slot == 0 and time.monotonic() >= self.forget_due:
            await self._forget_dead_workers()
        return leases.expects_more(result.live_workers)

    async def _forget_dead_workers(self) -> None:
        """Registrations of workers whose expiry passed an hour ago go (their leases expired long ago)."""
        self.forget_due = time.monotonic() + FORGET_INTERVAL_S  # a failure is not retried every round
        cur = await self.conn.execute(Q.forget_dead_workers)
        if cur.rowcount > 0:
            log.info("forgot the registrations of workers gone for an hour",
                     extra={"event": "dead workers forgotten", "count": cur.rowcount})

    async def _shards_left_free(self) -> bool:
        """Free or expired shards this worker could not take (locked): maybe a frozen owner's. Not
        when the shares cannot all be equal and the others simply hold theirs (3 workers: 86, 86, 84)."""
        cur = await self.conn.execute(Q.lease_census)
        return int((await cur.fetchone())[1]) > 0

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
