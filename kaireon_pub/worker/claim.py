"""The claim: which statement, with which parameters, and what to do when it meets a locked row.

The claim locks its rows NOWAIT. When it meets a pending row another session locks, it is made
again carefully (claim_careful_*): stepping around each such row and holding back the later rows
of its key. The worker stays careful while it knows of busy rows, and a while after (ShardScan).
In status mode the claim is one statement; in lock mode it runs inside the batch's transaction,
and meeting a locked row rolls that transaction back (MetLockedRow) before the careful claim.
"""

from __future__ import annotations

import uuid

import psycopg

from kaireon_pub.db.queries import Q, int_array
from kaireon_pub.settings import Settings
from kaireon_pub.worker.scan import ShardScan


class MetLockedRow(Exception):
    """The claim met a pending row another session locks (its transaction is rolled back)."""


def claim_params(settings: Settings, scan: ShardScan, shards: list[int], epochs: dict[int, int],
                 worker_id: uuid.UUID) -> dict:
    """Both modes' parameters: the shards in rotation, their fencing epochs and cursors."""
    return {
        "shards": int_array(shards),
        "epochs": int_array(epochs[sh] for sh in shards),
        **scan.cursor_params(shards),
        "worker_id": worker_id, "relaxed": not scan.strict, "batch": settings.batch_size,
    }


class Claimer:
    def __init__(self, scan: ShardScan):
        self.scan = scan

    async def claim(self, conn: psycopg.AsyncConnection, params: dict) -> list[tuple]:
        """Status mode: one claim; made again stepping around a row another session locks."""
        # Binary results: the payloads as bytes, not hex text to decode.
        if not self.scan.careful():
            try:
                return await (await conn.execute(Q.claim_batch, params, binary=True)).fetchall()
            except psycopg.errors.LockNotAvailable:
                self.scan.met_locked_row()
        return await (await conn.execute(Q.claim_careful_batch, self.scan.with_busy(params), binary=True)).fetchall()

    async def claim_locked(self, conn: psycopg.AsyncConnection, params: dict, careful: bool) -> list[tuple]:
        """Lock mode, inside the caller's transaction: the rows it returns stay locked until it ends.
        The plain claim meeting a locked row raises MetLockedRow (the caller rolls back and is careful)."""
        claim = Q.claim_careful_locked_batch if careful else Q.claim_locked_batch
        try:
            cur = await conn.execute(claim, self.scan.with_busy(params) if careful else params, binary=True)
        except psycopg.errors.LockNotAvailable as exc:
            if careful:
                raise
            raise MetLockedRow from exc  # rolls the transaction back
        return await cur.fetchall()
