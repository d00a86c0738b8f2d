"""`kaireon-pub partitions [list|create|drop|maintain] [--dry-run]`: the partitioned outbox by hand.

list: every partition, its range, estimated rows and size, and whether it may be dropped (and why
not). create: the partitions ahead (as worker 0 does). drop: drop the ones that may go, by the same
rules and steps as worker 0 (never one with a pending or processing row). --dry-run changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
import psycopg

from kaireon_pub.db import migrate, partitions
from kaireon_pub.db.connect import connect
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.ops.migrate import report_not_ready
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.ops.partitions")


def describe(conn: psycopg.Connection, settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for p in partitions.list_partitions(conn):
        s = partitions.state(conn, p.name)
        why = partitions.verdict(p, s, retention_seconds=settings.retention_seconds,
                                 failed_retention_seconds=settings.failed_retention_seconds)
        rows.append({"name": p.name, "from": p.lower.isoformat() if p.lower else None,
                     "to": p.upper.isoformat() if p.upper else None, "rows": max(p.rows, 0) if p.rows >= 0 else None,
                     "bytes": p.bytes, "pending": s.pending, "processing": s.processing, "failed": s.failed,
                     "retiring": p.retiring or p.detach_pending, "droppable": why is None,
                     "keptBecause": None if why == "its range has not ended" else why,
                     "current": p.upper is not None and p.upper > s.now and (p.lower is None or p.lower <= s.now)})
    return rows


def run(settings: Settings, action: str, *, dry_run: bool, ahead: int | None, as_json: bool,
        echo: Callable[[str], None]) -> int:
    try:
        with connect(settings, "partitions", direct=True) as conn:  # DETACH … CONCURRENTLY
            migrate.require_current(conn)
            if not partitions.is_partitioned(conn):
                echo("outbox_events is a plain table (OUTBOX_PARTITIONING applies to a fresh database; "
                     "see docs/operations.md, \"Converting a plain outbox\")")
                return ExitCode.OK
            interval = partitions.infer_interval(partitions.list_partitions(conn), settings.partitioning)
            doc: dict[str, Any] = {"interval": interval, "dryRun": dry_run}
            if action in ("create", "drop", "maintain"):
                report = partitions.maintain(conn, interval=interval, retention_seconds=settings.retention_seconds,
                                             failed_retention_seconds=settings.failed_retention_seconds,
                                             ahead=ahead, create=action != "drop", drop=action != "create",
                                             dry_run=dry_run)
                doc.update(created=report.created, dropped=report.dropped, kept=report.kept, errors=report.errors)
            doc["partitions"] = describe(conn, settings)
    except migrate.SchemaNotReady as exc:
        return report_not_ready(exc, "partitions")
    except psycopg.Error as exc:
        error_id = new_error_id()
        text = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, settings)
        log.error(f"partitions failed: {text}", extra={"event": "partitions failed", "errorId": error_id})
        echo(f"partitions failed: database error ({type(exc).__name__}): {text} (errorId {error_id})")
        return ExitCode.CRASH
    echo(orjson.dumps(doc).decode() if as_json else render(doc))
    return ExitCode.CRASH if doc.get("errors") else ExitCode.OK


def render(doc: dict[str, Any]) -> str:
    would = "would be " if doc["dryRun"] else ""
    lines = [f"partitioned {doc['interval']} on created_at; {len(doc['partitions'])} partitions"]
    for name in doc.get("created", []):
        lines.append(f"{would}created {name}")
    for name in doc.get("dropped", []):
        lines.append(f"{would}dropped {name}")
    for error in doc.get("errors", []):
        lines.append(f"error: {error}")
    lines.append(f"{'partition':<28} {'from':<25} {'to':<25} {'rows':>10} {'MB':>8}  state")
    for p in doc["partitions"]:
        if p["current"]:
            what = "current"
        elif p["droppable"]:
            what = "droppable"
        elif p["keptBecause"]:
            what = f"kept: {p['keptBecause']}"
        else:
            what = "ahead"
        rows = "?" if p["rows"] is None else str(p["rows"])
        lines.append(f"{p['name']:<28} {p['from'] or 'MINVALUE':<25} {p['to'] or 'MAXVALUE':<25} {rows:>10} "
                     f"{p['bytes'] / 1e6:>8.1f}  {what}")
    return "\n".join(lines)
