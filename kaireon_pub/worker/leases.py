"""Shard leases: every live worker of every replica takes about shards / live workers.

PostgreSQL is the coordinator. A worker registers itself with an expiry (database clock), renews
the leases it holds, releases what is above its fair share, and takes free or expired shards up
to it, bumping each shard's fencing epoch. It runs between batches, so a shard is never released
with a claim of this worker in flight. On taking a shard, rows a previous owner left in
`processing` go back to `pending` (their tokens cleared, so the old owner's mark cannot land).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import psycopg

from kaireon_pub.db.queries import Q

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
    def __init__(self, worker_id: uuid.UUID, slot: int, ttl_seconds: int):
        self.worker_id = worker_id
        self.slot = slot
        self.ttl = ttl_seconds
        self.owned: dict[int, int] = {}  # shard -> epoch
        self.next_rebalance = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.next_rebalance

    async def rebalance(self, conn: psycopg.AsyncConnection) -> RebalanceResult:
        """One round: register, renew, release above the fair share, acquire up to it."""
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
        fair = math.ceil(SHARDS / max(1, live))
        if len(self.owned) > fair:
            # Give back the highest shards; the others keep their cursors.
            extra = sorted(self.owned)[fair - len(self.owned):]
            cur = await conn.execute(Q.release_leases, {"worker_id": self.worker_id, "shards": extra})
            result.released = sorted(int(r[0]) for r in await cur.fetchall())
            for shard in extra:
                self.owned.pop(shard, None)
        elif len(self.owned) < fair:
            async with conn.transaction():
                cur = await conn.execute(Q.acquire_leases, {
                    "worker_id": self.worker_id, "n": fair - len(self.owned), "ttl": self.ttl,
                })
                taken = {int(shard): int(epoch) for shard, epoch in await cur.fetchall()}
                if taken:
                    cur = await conn.execute(Q.reset_shard_claims, {
                        "worker_id": self.worker_id, "shards": sorted(taken),
                    })
                    result.reset_rows = int((await cur.fetchone())[0])
            self.owned.update(taken)
            result.acquired = sorted(taken)
        # Below the fair share (a peer is releasing shards to us): look again soon.
        below = len(self.owned) < SHARDS // max(1, live)
        interval = min(self.ttl / 3, 0.5) if below else self.ttl / 3
        self.next_rebalance = time.monotonic() + interval
        return result

    async def release_all(self, conn: psycopg.AsyncConnection) -> int:
        """Drain: hand every shard back at once, and leave the tier."""
        shards = sorted(self.owned)
        async with conn.transaction():
            if shards:
                await conn.execute(Q.release_leases, {"worker_id": self.worker_id, "shards": shards})
            await conn.execute(Q.unregister_worker, {"worker_id": self.worker_id})
        self.owned.clear()
        return len(shards)
