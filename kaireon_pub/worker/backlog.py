"""Backlog gauges, refreshed by worker slot 0 every poll interval (beside the pending count).

`refresh_backlog_gauges(conn)` costs three statements whose work does not grow with the table:
- 256 index probes of outbox_events_claim_idx (the head of each shard's claim order, whose age is
  the shard's oldest pending age);
- pending per group of 16 shards, each group's count walking that index up to GROUP_CAP rows;
- failed rows, walking outbox_events_failed_idx up to FAILED_CAP rows.
Counts at their cap mean "at least"; kaireon_outbox_pending_count stays the total backlog.

Here, in the worker, which refreshes them (it imports nothing from the operator tools);
kaireon_pub.ops.gauges re-exports it. The statements are db/ops_queries.sql's, and the log lines
keep the logger name they had there.
"""

from __future__ import annotations

import logging

import psycopg

from kaireon_pub import metrics
from kaireon_pub.db.queries import load
from kaireon_pub.errors import new_error_id

log = logging.getLogger("kaireon_pub.ops.gauges")

OPS = load("ops_queries.sql")
GROUP_CAP = 1_000
FAILED_CAP = 100_000
SHARDS_PER_GROUP = 256 // metrics.SHARD_GROUPS


async def refresh_backlog_gauges(conn: psycopg.AsyncConnection) -> None:
    """Set oldest-pending age (overall and per shard group), pending per shard group and failed.

    `conn` must be in autocommit mode (the worker pool's connections are). A database error is
    logged with an errorId and swallowed, leaving the gauges at their last values: these gauges
    are observability and must never fail a tick (the tick's own claim reports the outage).
    """
    try:
        heads = await (await conn.execute(OPS.pending_heads)).fetchall()
        groups = await (await conn.execute(OPS.pending_by_shard_group, {"cap": GROUP_CAP})).fetchall()
        failed = (await (await conn.execute(OPS.failed_count_capped, {"cap": FAILED_CAP})).fetchone())[0]
    except psycopg.Error as exc:
        log.warning("backlog gauges not refreshed", extra={
            "event": "backlog gauges failed", "errorId": new_error_id(), "isTransient": True,
            "errorType": type(exc).__name__, "sqlstate": getattr(exc, "sqlstate", None)})
        return
    oldest_by_group = [0.0] * metrics.SHARD_GROUPS
    for shard, _event_id, age in heads:
        group = shard // SHARDS_PER_GROUP
        oldest_by_group[group] = max(oldest_by_group[group], max(0.0, age))
    metrics.OLDEST_PENDING_AGE.set(max(oldest_by_group))
    for group, count in groups:
        label = str(group)
        metrics.PENDING_BY_SHARD_GROUP.labels(label).set(count)
        metrics.OLDEST_PENDING_AGE_BY_SHARD_GROUP.labels(label).set(oldest_by_group[group])
    metrics.FAILED_COUNT.set(failed)
