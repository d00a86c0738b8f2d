"""The claim: which statement, with which parameters, and what to do when it meets a locked row.

The claim locks its rows NOWAIT. When it meets a pending row another session locks, it is made
again carefully (claim_careful_*): stepping around each such row and holding back the later rows
of its key. The worker stays careful while it knows of busy rows, and a while after (ShardScan).
In status mode the claim is one statement; in lock mode it runs inside the batch's transaction,
and meeting a locked row rolls that transaction back (MetLockedRow) before the careful claim.

A status-mode claim whose connection breaks may still commit afterwards, on the server, under a
token the worker never heard back about (OrphanedClaims): its rows are reset before every claim
until it can no longer commit (its session is gone, or its statement timeout has passed).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import psycopg

from kaireon_pub.db.queries import Q, int_array
from kaireon_pub.settings import Settings
from kaireon_pub.worker.scan import ShardScan

# Past its statement timeout, a claim cut off has ended on the server (this much more for its commit).
ORPHAN_MARGIN_S = 2.0


class MetLockedRow(Exception):
    """The claim met a pending row another session locks (its transaction is rolled back)."""


class OrphanedClaims:
    """Claims whose connection broke before their reply came (the claim may still be running on
    the server: blocked on a lock, a slow scan), by token: the backend that runs each (None behind
    a transaction pooler, where the client's pid is not the server's) and when it was sent.

    `reset` runs between batches, when nothing else of this worker is in flight: it puts this
    worker's rows in processing back to pending, and forgets the claims that can no longer commit,
    as seen *before* the reset (so the reset came after their end): their session is gone, or
    their statement timeout has passed. A claim that commits later is found by a later reset."""

    def __init__(self, statement_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.bound_s = statement_timeout_s + ORPHAN_MARGIN_S
        self.clock = clock
        self.claims: dict[uuid.UUID, tuple[int | None, float]] = {}

    def __bool__(self) -> bool:
        return bool(self.claims)

    def remember(self, token: uuid.UUID, backend_pid: int | None) -> None:
        self.claims[token] = (backend_pid, self.clock())

    async def reset(self, conn: psycopg.AsyncConnection, worker_id: uuid.UUID) -> int:
        now = self.clock()
        pids = [pid for pid, _ in self.claims.values() if pid]
        alive: set[int] = set()
        if pids:
            alive = {r[0] for r in await (await conn.execute(Q.sessions_alive, {"pids": pids})).fetchall()}
        reset = (await (await conn.execute(Q.reset_own_claims, {"worker_id": worker_id})).fetchone())[0]
        self.claims = {token: (pid, sent) for token, (pid, sent) in self.claims.items()
                       if now - sent < self.bound_s and (pid is None or pid in alive)}
        return reset


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
    def __init__(self, scan: ShardScan, settings: Settings):
        self.scan = scan
        self.orphans = OrphanedClaims(settings.statement_timeout_ms / 1000)
        # Behind a transaction pooler the connection's pid is the pooler's, not the server session's.
        self.server_pids = settings.pool_mode == "session"

    async def claim(self, conn: psycopg.AsyncConnection, params: dict) -> list[tuple]:
        """Status mode: one claim; made again stepping around a row another session locks. A claim
        whose connection breaks is remembered (OrphanedClaims) until it can no longer commit."""
        backend_pid = conn.info.backend_pid if self.server_pids else None
        try:
            return await self._claim(conn, params)
        except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable):
            raise  # the server ended the claim and said so: it committed nothing
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self.orphans.remember(params["token"], backend_pid)
            raise

    async def _claim(self, conn: psycopg.AsyncConnection, params: dict) -> list[tuple]:
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
