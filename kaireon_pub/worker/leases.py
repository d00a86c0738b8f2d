"""Shard leases: every live worker of every replica takes about shards / live workers.

PostgreSQL is the coordinator. A worker registers itself with an expiry (database clock), renews
the leases it holds, releases what is above its fair share, and takes free or expired shards up
to it, bumping each shard's fencing epoch. On taking a shard, rows a previous owner left in
`processing` go back to `pending` (their tokens cleared, so the old owner's mark cannot land).

The `LeaseKeeper` (worker/keeper.py) does this on its own clock and its own connection, beside the claim loop: a
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

import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import psycopg

from kaireon_pub.db.queries import Q

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

    def expects_more(self, live: int) -> bool:
        """Below the fair share while the others hold more than theirs (or shards are still free):
        some will come to this worker soon. Not when the shares cannot all be equal: with 3 live
        workers two hold 86 and one 84 for good, and that one takes nothing more by looking again."""
        fair = self.fair_share(live)
        return len(self.owned) < fair and SHARDS - len(self.owned) > (self.counted(live) - 1) * fair

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
