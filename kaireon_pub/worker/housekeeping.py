"""Worker 0's replica-wide chores, each a task of its own beside the claim loop.

- The backlog gauges (the pending count and the gauges of worker/backlog.py), and whether the
  database answered them (kaireon_outbox_database_up).
- The retention purge of published rows.
- The re-stamp of rows restored from another cluster.
- A partitioned outbox's maintenance (worker/partition_maintenance.py).

Each is one pass run by `lifecycle.every()` (the pass chooses its pause) and started by `start()`
in the worker's TaskSet, which restarts one that dies. They use the worker's pool, short
statements and their own pace, so a slow refresh or purge never delays a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import psycopg
import psycopg_pool

from kaireon_pub import metrics
from kaireon_pub.db.partitions import P
from kaireon_pub.db.queries import Q
from kaireon_pub.errors import new_error_id
from kaireon_pub.settings import Settings
from kaireon_pub.worker.backlog import refresh_backlog_gauges
from kaireon_pub.worker.lifecycle import TaskSet, every

log = logging.getLogger("kaireon_pub.worker.housekeeping")

PENDING_EXACT_CAP = 100_000
GAUGES_DUTY = 0.02  # share of one core the backlog gauges may take
GAUGES_MAX_INTERVAL = 30.0  # seconds; staler than this helps no one


async def refresh_pending_count(pool: psycopg_pool.AsyncConnectionPool) -> None:
    """Bounded cost: an exact count up to a cap, the planner's estimate above it."""
    async with pool.connection() as conn:
        cur = await conn.execute(Q.pending_count, {"cap": PENDING_EXACT_CAP})
        count = (await cur.fetchone())[0]
        estimated = count >= PENDING_EXACT_CAP
        if estimated:
            cur = await conn.execute(Q.pending_estimate)
            count = max(count, int((await cur.fetchone())[0] or 0))
        await refresh_backlog_gauges(conn)
    metrics.PENDING.set(count)
    metrics.PENDING_ESTIMATED.set(1 if estimated else 0)


def start(tasks: TaskSet, settings: Settings, pool: psycopg_pool.AsyncConnectionPool, role: str,
          stopping: Callable[[], bool], draining_backlog: Callable[[], bool]) -> None:
    """Worker 0's chores, each a task of `tasks` (restarted after a back-off if it dies)."""
    tasks.start("gauges", lambda: gauges_loop(settings, pool, stopping))
    if settings.retention_seconds > 0:
        tasks.start("purge", lambda: purge_loop(settings, pool, stopping, draining_backlog))
    tasks.start("foreign-rows", lambda: foreign_rows_loop(settings, pool, stopping))
    from kaireon_pub.worker.partition_maintenance import partitions_loop

    # A partitioned outbox's partitions ahead and partition retention; returns at once on a plain table.
    tasks.start("partitions", lambda: partitions_loop(settings, role, stopping))


def gauges_pause(settings: Settings, took: float) -> float:
    """The poll interval, or longer so that a refresh that took `took` s stays under GAUGES_DUTY."""
    return max(settings.poll_interval_ms / 1000, min(GAUGES_MAX_INTERVAL, took / GAUGES_DUTY))


async def gauges_loop(settings: Settings, pool: psycopg_pool.AsyncConnectionPool,
                      stopping: Callable[[], bool]) -> None:
    """Every poll interval, or less often when the refresh gets expensive.

    The statements are bounded, but on a large backlog that is draining they walk the index
    entries the claims just left dead: measured at 0.2–0.9 s of database time per refresh during
    a 1,000,000-event drain. A duty cycle keeps them under GAUGES_DUTY of one core, so the gauges
    never slow the drain they report on.
    """
    started = 0.0

    async def once() -> float:
        nonlocal started
        started = time.monotonic()
        await refresh_pending_count(pool)
        metrics.DATABASE_UP.set(1)
        return gauges_pause(settings, time.monotonic() - started)

    def failed(exc: Exception) -> float:  # a gauge failure must not stop the publisher
        metrics.DATABASE_UP.set(0)
        log.warning(f"pending count refresh failed: {type(exc).__name__}: {exc}",
                    extra={"event": "gauges failed", "errorId": new_error_id(), "isTransient": True})
        return gauges_pause(settings, time.monotonic() - started)

    await every(once, stopping, on_error=failed)


async def purge_once(settings: Settings, pool: psycopg_pool.AsyncConnectionPool,
                     draining_backlog: Callable[[], bool]) -> float | None:
    """One purge batch; the pause before the next, or None on a partitioned table."""
    if draining_backlog():
        return 1.0
    started = time.monotonic()
    async with pool.connection() as conn:
        if (await (await conn.execute(P.is_partitioned)).fetchone())[0]:
            return None  # partitioned: retention drops partitions (worker/partition_maintenance.py)
        cur = await conn.execute(Q.purge_published, {"retention": settings.retention_seconds,
                                                     "batch": settings.purge_batch_size})
        purged = (await cur.fetchone())[0]
    took = time.monotonic() - started
    metrics.PURGE_DURATION.observe(took)
    metrics.PURGED.inc(purged)
    if purged >= settings.purge_batch_size:
        return max(0.1, 9 * took)  # more to do: keep going on a 10 % duty cycle
    return settings.purge_interval_seconds


async def purge_loop(settings: Settings, pool: psycopg_pool.AsyncConnectionPool,
                     stopping: Callable[[], bool], draining_backlog: Callable[[], bool]) -> None:
    """Retention: delete published rows older than OUTBOX_RETENTION_SECONDS, in bounded batches,
    with a pause between them; none while a backlog drains (the claim has the database)."""

    def failed(exc: Exception) -> float:  # the purge must never stop the publisher
        log.error(f"retention purge failed: {type(exc).__name__}: {exc}",
                  extra={"event": "purge failed", "errorId": new_error_id(), "isTransient": True})
        return settings.purge_interval_seconds

    await every(lambda: purge_once(settings, pool, draining_backlog), stopping, on_error=failed)


async def foreign_rows_loop(settings: Settings, pool: psycopg_pool.AsyncConnectionPool,
                            stopping: Callable[[], bool]) -> None:
    """Rows restored from another cluster (their xid above this cluster's counter) are re-stamped
    so that they publish: by every worker before its first claim, by each claim in its own shards
    (worker/horizon.py: before a newer event of their keys can be claimed), and by worker 0 every
    OUTBOX_RESCAN_INTERVAL_MS in every shard (one no worker claims from, during a rebalance)."""
    interval = settings.rescan_interval_ms / 1000

    async def once() -> float:
        async with pool.connection() as conn:
            await restamp_foreign_rows(conn)
        return interval

    def failed(exc: Exception) -> float:  # retried on the next pass
        log.warning(f"re-stamping foreign rows failed: {type(exc).__name__}: {exc}",
                    extra={"event": "foreign rows failed", "errorId": new_error_id(), "isTransient": True})
        return interval

    await asyncio.sleep(interval)  # every worker did it at start
    await every(once, stopping, on_error=failed)


async def restamp_foreign_rows(conn: psycopg.AsyncConnection) -> int:
    """One pass of the re-stamp (cheap when there is nothing: an index probe per shard)."""
    cur = await conn.execute(Q.restamp_foreign_rows)
    restamped = (await cur.fetchone())[0]
    if restamped:
        await conn.execute(Q.notify_rescan)  # they now sort before the cursors
        metrics.FOREIGN_RESTAMPED.inc(restamped)
        log.warning("pending rows carried transaction ids from another cluster (a restore, COPY "
                    "or replication); re-stamped to publish before the events written since",
                    extra={"event": "foreign rows restamped", "count": restamped})
    return restamped
