"""The lease keeper on the real PostgreSQL: what it leaves in outbox_workers."""

from __future__ import annotations

import asyncio
import uuid

import psycopg

from kaireon_pub.worker.keeper import LeaseKeeper
from kaireon_pub.worker.leases import Leases


def test_worker_0_deletes_the_registrations_of_workers_gone_for_an_hour(db, db_url):
    """A worker killed without its drain (SIGKILL, OOM, a lost node) leaves its row; nothing
    deleted them, one more per such exit, counted by every renewal of every worker."""
    gone, recent = uuid.uuid4(), uuid.uuid4()
    for worker_id, expired in ((gone, "61 minutes"), (recent, "59 minutes")):
        db.execute("INSERT INTO outbox_workers (worker_id, hostname, pid, slot, expires_at) "
                   "VALUES (%s, 'h', 1, 0, clock_timestamp() - %s::interval)", (worker_id, expired))

    async def one_round(slot: int) -> None:
        async def connect():
            return await psycopg.AsyncConnection.connect(db_url, autocommit=True)

        keeper = LeaseKeeper(Leases(uuid.uuid4(), slot, ttl_seconds=10), connect, lambda _r: None, listen=False)
        await keeper.attempt()
        await keeper.close()

    def registered() -> set[uuid.UUID]:
        return {r[0] for r in db.execute("SELECT worker_id FROM outbox_workers")}

    asyncio.run(one_round(slot=1))  # only worker 0 of a replica does it
    assert {gone, recent} <= registered()
    asyncio.run(one_round(slot=0))
    assert gone not in registered() and recent in registered()
