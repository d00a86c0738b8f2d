"""The claim horizon and what the worker remembers of it.

The claim takes no row of a transaction that may still commit rows before it (claim_horizon).
A transaction open longer than OUTBOX_HORIZON_MAX_WAIT_MS is passed over: the horizon stops
waiting for it, and the worker remembers its xid, to rescan from it once it ends (its rows, if it
committed any, sit behind the cursors). Running xids whose session the tier cannot see (another
role's, when the tier's role is not a member of pg_read_all_stats) are timed here, from when they
were first seen, until they end: passed over once, such a transaction stays passed over, and
while it is waited for, the horizon age counts from that first sighting.

Before each claim the horizon statement also looks, in the same snapshot, for rows of the claim's
shards restored from another cluster (an xid above this cluster's counter); if there are some,
they are re-stamped and those shards' cursors go back to their start: a restored row goes before
every newer event of its key that this claim could take (`rewound` tells the tick to take the
cursors again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg

from kaireon_pub import metrics
from kaireon_pub.db.queries import Q, int_array
from kaireon_pub.worker.scan import ZERO_CURSOR, ShardScan

log = logging.getLogger("kaireon_pub.worker")

MAX_PASSED_OVER = 10_000  # passed-over transactions remembered one by one


class Horizon:
    def __init__(self, max_wait_ms: int, scan: ShardScan, clock: Callable[[], float] = time.monotonic):
        self.max_wait_ms = max_wait_ms
        self.scan = scan
        self.clock = clock
        self.passed_over: dict[int, float] = {}  # xids the horizon stopped waiting for -> when
        self.unknown_since: dict[int, float] = {}  # running xids with no visible session -> first seen
        self.unknown_passed: list[int] = []
        self.rewound = False  # the last read moved cursors back: the claim takes them again

    async def read(self, conn: psycopg.AsyncConnection, shards: list[int] | None = None) -> str:
        """The claim horizon now; remembers the transactions it stopped waiting for, and rescans
        from the xid of each of those that has ended since. With `shards` (the claim's), rows of
        theirs restored from another cluster, seen in the horizon's snapshot, are re-stamped."""
        now = self.clock()
        pass_over = self.due_to_pass(now)
        params = {"max_wait_ms": self.max_wait_ms, "remembered": list(self.passed_over), "pass_over": pass_over}
        if shards is None:
            cur = await conn.execute(Q.claim_horizon, params)
            (horizon, held_for, bypassed, unknown, ended), foreign = await cur.fetchone(), False
        else:
            cur = await conn.execute(Q.claim_horizon_foreign, {**params, "shards": int_array(shards)})
            horizon, held_for, bypassed, unknown, ended, foreign = await cur.fetchone()
        self.rewound = bool(ended)
        fresh = self.absorb(now, held_for, bypassed, unknown, ended)
        if foreign:
            await self.restamp(conn, shards)
        if fresh:
            self.remember(fresh)
            await self._report(conn, fresh)
        return str(horizon)

    async def restamp(self, conn: psycopg.AsyncConnection, shards: list[int]) -> None:
        """Rows restored from another cluster in `shards`: re-stamped to sort first, and those shards
        scanned from their start."""
        cur = await conn.execute(Q.restamp_shards_foreign_rows, {"shards": int_array(shards)})
        count = (await cur.fetchone())[0]
        for shard in shards:  # also when another worker's pass over every shard re-stamped them first
            self.scan.rewind(shard, ZERO_CURSOR)
        self.rewound = True
        if not count:
            return
        metrics.FOREIGN_RESTAMPED.inc(count)
        log.warning("pending rows carried transaction ids from another cluster (a restore, COPY "
                    "or replication); re-stamped to publish before the events written since",
                    extra={"event": "foreign rows restamped", "count": count, "shards": len(shards)})

    def due_to_pass(self, now: float) -> list[int]:
        """The unknown xids waited for OUTBOX_HORIZON_MAX_WAIT_MS: the horizon passes them now (and
        at every read after, until they end)."""
        wait_s = self.max_wait_ms / 1000
        self.unknown_passed = [x for x, seen in self.unknown_since.items() if now - seen >= wait_s]
        return self.unknown_passed

    def absorb(self, now: float, held_for: float | None, bypassed: list[int], unknown: list[int],
               ended: list[int]) -> list[int]:
        """One horizon reading: times the unknown xids, rewinds every cursor to the xids passed over
        that have ended; returns the xids passed over for the first time.

        `unknown` lists the unknown xids still waited for; `bypassed` those passed over, which
        includes the unknown ones passed back in `pass_over` while they run. A timer is kept until
        its xid leaves both (it ended), so a passed-over transaction is never waited for again."""
        running = set(unknown).union(x for x in bypassed if x in self.unknown_since)
        self.unknown_since = {x: self.unknown_since.get(x, now) for x in running}
        # The oldest transaction the claim still waits for: one whose start the tier sees
        # (held_for), or an unknown one, timed from when this worker first saw it.
        waited = [now - self.unknown_since[x] for x in unknown]
        metrics.HORIZON_AGE.set(max(0.0, held_for or 0.0, *waited))
        for xid in ended:
            # Its rows (if it committed any) sit behind the cursors: look again from its xid.
            self.passed_over.pop(xid, None)
            self.scan.rewind_every((xid, 0))
        return [xid for xid in bypassed if xid not in self.passed_over]

    def remember(self, xids: list[int]) -> None:
        if len(self.passed_over) + len(xids) > MAX_PASSED_OVER:
            # Too many to track one by one: a full rescan of every shard finds their rows.
            self.passed_over.clear()
            self.scan.full_rescan_now()
        now = self.clock()
        for xid in xids:
            self.passed_over[xid] = now
        metrics.HORIZON_BYPASSED.inc(len(xids))

    async def _report(self, conn: psycopg.AsyncConnection, xids: list[int]) -> None:
        cur = await conn.execute(Q.horizon_holders, {"max_wait_ms": self.max_wait_ms,
                                                     "pass_over": self.unknown_passed})
        holders = [h for h in await cur.fetchall() if h[4]]
        for pid, gid, database, application, _bypassed, age in holders[:5]:
            log.warning("the claim stopped waiting for a transaction open longer than OUTBOX_HORIZON_MAX_WAIT_MS; "
                        "its rows are published when it ends", extra={
                            "event": "horizon bypass", "xids": xids, "holderPid": pid, "holderGid": gid,
                            "database": database, "application": application,
                            "ageSeconds": None if age is None else round(age, 1)})
