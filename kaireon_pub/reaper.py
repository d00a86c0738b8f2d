"""The stuck-row reaper: `processing` rows older than the staleness go back to `pending`.

One run is one transaction on the tier's own connection: the bulk `reap_stale` UPDATE (its
time comparison uses the database clock), the `outbox_reaper_runs` row, and, when rows were
reset, a NOTIFY so the workers rescan behind their cursors (delivered only on commit).

Concurrent runs are harmless: the UPDATE re-checks `status = 'processing'` under each row's
lock, so a row another run has just reset is skipped (READ COMMITTED re-evaluates the WHERE on
the new row version). Within one process `reap()` is also single-flight, and the HTTP route does
not even wait for it: while a run is in flight another call gets 429 (kaireon_pub/http/app.py),
so a burst of cron calls opens no burst of connections and parks no request thread.

Both the HTTP route (source "http") and `kaireon-pub reap` (source "cli") call `reap()`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import UTC, datetime

import orjson
import psycopg

from kaireon_pub.db import migrate
from kaireon_pub.db.connect import connect
from kaireon_pub.db.migrate import SchemaNotReady
from kaireon_pub.db.queries import Q
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.reaper")

RESULT_KEYS = ("status", "stalenessSeconds", "resetCount", "durationMs", "timestamp")

_single_flight = threading.Lock()
# A caller waits at most this long behind a run in flight (beyond that run's own bounds).
_LOCK_GRACE_SECONDS = 10.0


class ReaperError(Exception):
    """A reaper run failed; the failure was logged under `error_id` (the message holds no secret).

    `schema` is the SchemaNotReady behind it, when the database is not migrated.
    """

    def __init__(self, error_id: str, schema: SchemaNotReady | None = None):
        self.error_id = error_id
        self.schema = schema
        super().__init__(f"reaper run failed (errorId={error_id})")


def reap(settings: Settings, *, source: str) -> dict[str, object]:
    """Run the reaper once, single-flight within this process; see `run_once`."""
    # Bounded: a run in flight ends within connect_timeout + statement_timeout.
    wait = 5 + settings.statement_timeout_ms / 1000 + _LOCK_GRACE_SECONDS
    if not _single_flight.acquire(timeout=wait):
        from kaireon_pub import metrics

        error_id = new_error_id()
        metrics.REAPER_RUNS.labels(source).inc()
        metrics.REAPER_FAILURES.labels(source).inc()
        log.error(
            "reaper run skipped: another run in this process did not finish in time",
            extra={"event": "reaper failed", "errorId": error_id, "source": source,
                   "waitedSeconds": wait},
        )
        raise ReaperError(error_id)
    try:
        return run_once(settings, source=source)
    finally:
        _single_flight.release()


def run_once(settings: Settings, *, source: str) -> dict[str, object]:
    """One run without the process lock; the database alone keeps concurrent runs correct.

    Returns exactly the spec's body: status, stalenessSeconds, resetCount, durationMs, timestamp.
    Raises `ReaperError` after logging the failure with an errorId and counting it.
    """
    from kaireon_pub import metrics

    staleness = settings.reaper_staleness_seconds
    metrics.REAPER_RUNS.labels(source).inc()
    started = time.monotonic()
    try:
        with connect(settings, "reaper") as conn, conn.transaction():
            migrate.require_current(conn)
            reset_count = reset_stale(conn, staleness)
            duration_ms = round((time.monotonic() - started) * 1000)
            conn.execute(Q.record_reaper_run,
                         {"source": source, "reset_count": reset_count, "duration_ms": duration_ms})
            if reset_count > 0:
                conn.execute(Q.notify_rescan)
    except migrate.SchemaNotReady as exc:
        error_id = new_error_id()
        metrics.REAPER_FAILURES.labels(source).inc()
        log.error(f"reaper run failed: {exc}", extra={
            "event": "reaper failed", "errorId": error_id, "source": source, "errorType": "SchemaNotReady",
            "schemaVersion": exc.current, "expectedVersion": exc.expected, "isTransient": False})
        raise ReaperError(error_id, schema=exc) from None
    except Exception as exc:
        error_id = new_error_id()
        metrics.REAPER_FAILURES.labels(source).inc()
        log.error(
            "reaper run failed",
            extra={"event": "reaper failed", "errorId": error_id, "source": source,
                   "stalenessSeconds": staleness, "errorType": type(exc).__name__,
                   "sqlstate": getattr(exc, "sqlstate", None), "error": redact(str(exc), settings),
                   "isTransient": isinstance(exc, psycopg.OperationalError)},
        )
        raise ReaperError(error_id) from None

    elapsed = time.monotonic() - started
    metrics.REAPER_RESET.inc(reset_count)
    metrics.REAPER_DURATION.observe(elapsed)
    result: dict[str, object] = {
        "status": "ok",
        "stalenessSeconds": staleness,
        "resetCount": reset_count,
        "durationMs": duration_ms,
        "timestamp": utc_timestamp(),
    }
    # Resets mean a worker died or stalled mid-batch: worth a warning, not an error.
    log.log(
        logging.WARNING if reset_count else logging.INFO,
        f"reaper reset {reset_count} stale processing rows",
        extra={"event": "reaper run", "source": source, "resetCount": reset_count,
               "stalenessSeconds": staleness, "durationMs": duration_ms},
    )
    return result


def reset_stale(conn: psycopg.Connection, staleness_seconds: int) -> int:
    """The single bulk UPDATE; returns how many rows this statement reset."""
    row = conn.execute(Q.reap_stale, {"staleness": staleness_seconds}).fetchone()
    return int(row[0]) if row else 0


def utc_timestamp() -> str:
    """ISO-8601 UTC with milliseconds and Z, as in the spec: 2026-04-30T14:20:00.000Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_cli_reap(settings: Settings) -> int:
    """`kaireon-pub reap`: one run, the JSON on stdout; 0, 1 after a logged failure, or 5 (and
    one line saying to migrate) when the schema is missing or behind."""
    # prometheus_client (imported by the run) writes its multiprocess files there: make sure it
    # exists, so a CLI run beside the tier shows up in the tier's /metrics.
    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if multiproc_dir:
        os.makedirs(multiproc_dir, exist_ok=True)
    try:
        result = reap(settings, source="cli")
    except ReaperError as exc:
        if exc.schema is not None:
            sys.stderr.write(f"reap: {exc.schema}\n")
            return ExitCode.SCHEMA_MISSING
        return ExitCode.CRASH  # already logged with its errorId
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()
    return ExitCode.OK
