"""Worker 0's maintenance of a partitioned outbox (kaireon_pub.db.partitions): partitions made
ahead and retention by dropping whole partitions, every OUTBOX_PURGE_INTERVAL_SECONDS.

On a plain table it returns at once (the row purge of housekeeping.purge_loop is the retention
there; on a partitioned table that purge does nothing). The round runs on a connection of its
own, in a thread (the DDL waits for locks: bounded by a lock timeout and the statement timeout,
never by the claim loop), under the worker's session name: the horizon never waits for it (it
inserts no outbox row; DETACH CONCURRENTLY's wait must not hold the claim back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kaireon_pub import metrics
from kaireon_pub.db import partitions
from kaireon_pub.db.connect import connect
from kaireon_pub.errors import new_error_id
from kaireon_pub.settings import Settings
from kaireon_pub.worker.lifecycle import every

log = logging.getLogger("kaireon_pub.worker.partitions")


NOT_OWNER = partitions.Report(kept={"*": "the tier's role does not own outbox_events"})


def one_round(settings: Settings, role: str) -> partitions.Report | None:
    """One maintenance round; None when outbox_events is not partitioned. Under a role that does
    not own the table (the least-privilege runtime role: README, "Database roles") only the gauges:
    making and dropping partitions is then the owner's `kaireon-pub partitions maintain`."""
    with connect(settings, role, direct=True) as conn:  # DETACH … CONCURRENTLY: not through a transaction pooler
        if not partitions.is_partitioned(conn):
            return None
        if not partitions.owns_outbox(conn):
            publish_gauges(partitions.list_partitions(conn), conn.execute("SELECT clock_timestamp()").fetchone()[0])
            return NOT_OWNER
        interval = partitions.infer_interval(partitions.list_partitions(conn), settings.partitioning)
        report = partitions.maintain(conn, interval=interval, retention_seconds=settings.retention_seconds,
                                     failed_retention_seconds=settings.failed_retention_seconds,
                                     on_drop=lambda _name: metrics.PARTITIONS_DROPPED.inc())
        publish_gauges(partitions.list_partitions(conn), conn.execute("SELECT clock_timestamp()").fetchone()[0])
    return report


def publish_gauges(found: list[partitions.Partition], now) -> None:
    metrics.PARTITIONS.set(len(found))
    starts = [p.lower or p.upper for p in found if (p.lower or p.upper) is not None]
    metrics.OLDEST_PARTITION_AGE.set(max(0.0, (now - min(starts)).total_seconds()) if starts else 0)


async def partitions_once(settings: Settings, role: str, said: set[str] | None = None) -> float | None:
    """One round, in a thread; the pause before the next, or None on a plain table. `said` keeps
    what was logged once per worker (that the tier's role leaves maintenance to the owner, that
    partitions cannot be detached through a transaction pooler)."""
    started = time.monotonic()
    report = await asyncio.to_thread(one_round, settings, role)
    if report is None:
        return None
    if report is NOT_OWNER:
        if said is not None and "not owner" not in said:
            said.add("not owner")
            log.info("partition maintenance is the owner's job: the tier's role does not own outbox_events; "
                     "run `kaireon-pub partitions maintain` as the owner (README, Database roles)",
                     extra={"event": "partition maintenance skipped"})
        return settings.purge_interval_seconds
    cannot = sorted(name for name, why in report.kept.items() if why == partitions.CANNOT_DETACH)
    if cannot and said is not None and "cannot detach" not in said:
        said.add("cannot detach")  # said once: the same every round until the setting changes
        log.warning(f"partition maintenance keeps partitions that may go: {partitions.CANNOT_DETACH}",
                    extra={"event": "partition maintenance skipped", "partitions": cannot})
    for error in report.errors:
        log.warning(f"partition maintenance: {error}", extra={
            "event": "partition maintenance failed", "errorId": new_error_id(), "isTransient": True})
    if report.created or report.dropped:
        # Not `created`: a LogRecord attribute, which `extra` may not overwrite (KeyError).
        log.info("partition maintenance", extra={
            "event": "partition maintenance", "partitionsCreated": report.created,
            "partitionsDropped": report.dropped, "partitionsKept": len(report.kept),
            "durationMs": round((time.monotonic() - started) * 1000)})
    return settings.purge_interval_seconds


async def partitions_loop(settings: Settings, role: str, stopping: Callable[[], bool]) -> None:
    def failed(exc: Exception) -> float:  # maintenance must never stop the publisher
        log.error(f"partition maintenance failed: {type(exc).__name__}: {exc}",
                  extra={"event": "partition maintenance failed", "errorId": new_error_id(),
                         "isTransient": True})
        return settings.purge_interval_seconds

    said: set[str] = set()
    await every(lambda: partitions_once(settings, role, said), stopping, on_error=failed)
