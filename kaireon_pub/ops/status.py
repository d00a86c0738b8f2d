"""`kaireon-pub status`: what the outbox holds and who works on it, cheaply, on any table size.

Every figure comes from a bounded query (see db/ops_queries.sql). Which figures are exact:
- counts per status are exact below STATUS_CAP; above it they are the planner's estimate
  (reltuples x the status frequency of the last ANALYZE), marked `estimate`, or only the cap
  ("at least") when the table was never analyzed;
- the oldest pending age is the oldest of the 256 shard heads (the first row of each shard's
  claim order): exact unless a transaction inserted a row long after it began;
- pending per lagging shard and "published in the last minute" are exact below their caps;
- failed events are grouped by error over the newest ERROR_SAMPLE failed rows only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg

from kaireon_pub.db import migrate
from kaireon_pub.db.connect import connect
from kaireon_pub.db.queries import Q
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.ops.migrate import report_not_ready
from kaireon_pub.ops.sql import OPS
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.ops.status")

STATUSES = ("pending", "processing", "published", "failed")
STATUS_CAP = 100_000
SHARD_CAP = 10_000
PUBLISHED_MINUTE_CAP = 1_000_000
LAGGING_SHARDS = 5
ERROR_SAMPLE = 1_000
ERROR_GROUPS = 10
REAPER_RUNS = 5


@dataclass(frozen=True)
class Figure:
    """A count and how far to trust it."""

    count: int
    estimate: bool = False  # the planner's estimate, not a count
    at_least: bool = False  # the cap was reached and no estimate exists: a lower bound

    def text(self) -> str:
        if self.at_least:
            return f">= {self.count:,}"
        return f"~{self.count:,} (estimate)" if self.estimate else f"{self.count:,}"

    def as_json(self) -> dict[str, Any]:
        return {"count": self.count, "estimate": self.estimate, "atLeast": self.at_least}


def capped(count: int, cap: int) -> Figure:
    return Figure(count, at_least=count >= cap)


def run(settings: Settings, *, as_json: bool, echo: Callable[[str], None]) -> int:
    """The command: collect, print (text or JSON); 1 after a logged database failure, 5 when
    the schema is missing or behind (one line saying to migrate)."""
    try:
        with connect(settings, "status") as conn:
            migrate.require_current(conn)
            doc = collect(conn, settings.horizon_max_wait_ms)
            doc["partitions"] = partition_summary(conn, settings)
    except migrate.SchemaNotReady as exc:
        return report_not_ready(exc, "status")
    except psycopg.Error as exc:
        error_id = new_error_id()
        log.error("status failed", extra={"event": "status failed", "errorId": error_id,
                                          "errorType": type(exc).__name__,
                                          "error": redact(str(exc), settings)})
        return ExitCode.CRASH
    echo(orjson.dumps(doc).decode() if as_json else render(doc))
    return ExitCode.OK


def horizon_holders(conn: psycopg.Connection, max_wait_ms: int) -> dict[str, Any]:
    """What the claim horizon waits for now (or has passed over): the `horizon` of status --json."""
    held_by = []
    for pid, gid, database, application, bypassed, age in conn.execute(
            Q.horizon_holders, {"max_wait_ms": max_wait_ms, "pass_over": []}).fetchall():
        who: dict[str, Any] = {"pid": pid} if pid is not None else ({"gid": gid} if gid else {"pid": None})
        held_by.append({**who, "database": database, "application": application,
                        "ageSeconds": None if age is None else round(max(0.0, age), 1), "bypassed": bypassed})
    waiting = [h["ageSeconds"] for h in held_by if not h["bypassed"] and h["ageSeconds"] is not None]
    return {"ageSeconds": max(waiting) if waiting else None, "maxWaitMs": max_wait_ms, "heldBy": held_by}


def partition_summary(conn: psycopg.Connection, settings: Settings) -> dict[str, Any] | None:
    """A partitioned outbox's partitions (None on a plain table): count, oldest, and the ones kept."""
    from kaireon_pub.db import partitions

    if not partitions.is_partitioned(conn):
        return None
    found = partitions.list_partitions(conn)
    kept = []
    now = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    for p in found:
        if p.upper is not None and p.upper <= now:
            why = partitions.verdict(p, partitions.state(conn, p.name), retention_seconds=settings.retention_seconds,
                                     failed_retention_seconds=settings.failed_retention_seconds)
            kept.append({"name": p.name, "to": _iso(p.upper), "droppable": why is None, "keptBecause": why})
    starts = [p.lower or p.upper for p in found if (p.lower or p.upper) is not None]
    return {"count": len(found), "interval": partitions.infer_interval(found, settings.partitioning),
            "oldestAgeSeconds": round((now - min(starts)).total_seconds(), 1) if starts else None,
            "newestEnd": _iso(found[-1].upper) if found else None, "past": kept}


def collect(conn: psycopg.Connection, horizon_max_wait_ms: int = 5000) -> dict[str, Any]:
    """Every figure of `status`, as the JSON document `status --json` prints."""
    started = time.monotonic()
    counts = conn.execute(OPS.status_counts_capped, {"cap": STATUS_CAP}).fetchone()
    backlog = _backlog(conn, dict(zip(STATUSES, counts, strict=True)))

    heads = conn.execute(OPS.pending_heads).fetchall()
    heads.sort(key=lambda h: h[2], reverse=True)
    oldest = heads[0] if heads else None
    lagging = _lagging_shards(conn, heads[:LAGGING_SHARDS])

    published_minute = conn.execute(OPS.published_last_minute, {"cap": PUBLISHED_MINUTE_CAP}).fetchone()[0]
    errors = conn.execute(OPS.failed_errors, {"sample": ERROR_SAMPLE, "groups": ERROR_GROUPS}).fetchall()
    owners = conn.execute(OPS.shard_ownership).fetchall()
    unowned = conn.execute(OPS.unowned_shards).fetchone()[0]
    live_workers = conn.execute(OPS.live_workers).fetchone()[0]
    runs = conn.execute(OPS.recent_reaper_runs, {"limit": REAPER_RUNS}).fetchall()
    runs_hour, reset_hour = conn.execute(OPS.reaper_last_hour).fetchone()
    horizon = horizon_holders(conn, horizon_max_wait_ms)
    foreign = conn.execute(Q.foreign_rows_count).fetchone()[0]

    return {
        "backlog": {name: figure.as_json() for name, figure in backlog.items()},
        "oldestPending": None if oldest is None else {
            "ageSeconds": round(max(0.0, oldest[2]), 3), "eventId": oldest[1], "shard": oldest[0]},
        "publishedLastMinute": capped(published_minute, PUBLISHED_MINUTE_CAP).as_json(),
        "laggingShards": lagging,
        "horizon": horizon,
        "foreignRows": foreign,
        "failed": {
            **backlog["failed"].as_json(),
            "sampledNewest": ERROR_SAMPLE,
            "byError": [{"error": e, "count": n, "newest": _iso(newest), "topics": list(topics or []),
                         "firstId": first, "lastId": last}
                        for e, n, newest, topics, first, last in errors],
        },
        "shards": {
            "owned": 256 - unowned, "unowned": unowned, "liveWorkers": live_workers,
            "owners": [{"workerId": str(owner), "shards": shards, "hostname": host, "pid": pid,
                        "slot": slot, "registered": registered}
                       for owner, shards, host, pid, slot, registered in owners],
        },
        "reaper": {
            "runsLastHour": runs_hour, "resetLastHour": reset_hour,
            "recent": [{"ranAt": _iso(at), "source": src, "resetCount": n, "durationMs": ms}
                       for at, src, n, ms in runs],
        },
        "estimates": sorted(f"backlog.{name}" for name, f in backlog.items() if f.estimate or f.at_least)
        + (["publishedLastMinute"] if published_minute >= PUBLISHED_MINUTE_CAP else []),
        "durationMs": round((time.monotonic() - started) * 1000),
    }


def _backlog(conn: psycopg.Connection, counts: dict[str, int]) -> dict[str, Figure]:
    figures = {name: Figure(n) for name, n in counts.items()}
    over = [name for name, n in counts.items() if n >= STATUS_CAP]
    if not over:
        return figures
    estimates: dict[str, int] = {}
    analyzed = False
    for status, n, was_analyzed in conn.execute(OPS.status_estimates).fetchall():
        analyzed = analyzed or bool(was_analyzed)
        if status is not None:
            estimates[status] = int(n)
    for name in over:
        estimate = estimates.get(name, 0) if analyzed else 0
        if estimate > STATUS_CAP:
            figures[name] = Figure(estimate, estimate=True)
        else:
            # Statistics are missing or older than the growth: all we know is the cap.
            figures[name] = Figure(STATUS_CAP, at_least=True)
    return figures


def _lagging_shards(conn: psycopg.Connection, heads: list[tuple]) -> list[dict[str, Any]]:
    if not heads:
        return []
    shards = [h[0] for h in heads]
    counts = dict(conn.execute(OPS.pending_in_shards, {"shards": shards, "cap": SHARD_CAP}).fetchall())
    owners = {row[0]: row[1:] for row in conn.execute(OPS.shard_owners, {"shards": shards}).fetchall()}
    lagging = []
    for shard, event_id, age in heads:
        owner = owners.get(shard)
        lagging.append({
            "shard": shard, "oldestAgeSeconds": round(max(0.0, age), 3), "oldestEventId": event_id,
            "pending": capped(counts.get(shard, 0), SHARD_CAP).as_json(),
            "owner": None if owner is None else {
                "workerId": str(owner[0]), "hostname": owner[1], "pid": owner[2], "slot": owner[3]},
        })
    return lagging


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds")


# ---- the human view ---------------------------------------------------------------------------


def _figure(d: dict[str, Any]) -> str:
    return Figure(d["count"], d["estimate"], d["atLeast"]).text()


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(doc: dict[str, Any]) -> str:
    lines = ["Backlog"]
    for name in STATUSES:
        lines.append(f"  {name:<12}{_figure(doc['backlog'][name])}")
    oldest = doc["oldestPending"]
    lines.append(f"  oldest pending: {_age(oldest['ageSeconds'])} (event {oldest['eventId']}, shard {oldest['shard']})"
                 if oldest else "  oldest pending: none")
    lines.append(f"  published in the last minute: {_figure(doc['publishedLastMinute'])}")

    horizon = doc["horizon"]
    lines += ["", "What the claim waits for (transactions that may still write the outbox)"]
    if not horizon["heldBy"]:
        lines.append("  nothing: every open transaction of this database is past or cannot write the outbox")
    for h in horizon["heldBy"]:
        who = f"pid {h['pid']}" if "pid" in h else f"prepared transaction {h['gid']!r}"
        state = (f"passed over after {horizon['maxWaitMs']} ms; its rows are published when it ends"
                 if h["bypassed"] else "HOLDS publishing of every newer event")
        age = _age(h["ageSeconds"]) if h["ageSeconds"] is not None else "?"
        lines.append(f"  {who}  database {h['database']}  application {h['application'] or '-'}  "
                     f"open {age}: {state}")
    if doc["foreignRows"]:
        lines.append(f"  {doc['foreignRows']:,} pending rows carry transaction ids from another cluster "
                     "(a restore): the workers re-stamp them before their claims")

    lines += ["", "Most lagging shards (oldest pending first)"]
    if not doc["laggingShards"]:
        lines.append("  none: nothing is pending")
    for s in doc["laggingShards"]:
        owner = s["owner"]
        who = f"{owner['hostname']} pid {owner['pid']} slot {owner['slot']}" if owner and owner["hostname"] else (
            f"worker {owner['workerId']}" if owner else "NO LIVE OWNER")
        lines.append(f"  shard {s['shard']:>3}  oldest {_age(s['oldestAgeSeconds']):>9}  "
                     f"pending {_figure(s['pending']):>10}  owner {who}")

    failed = doc["failed"]
    lines += ["", f"Failed events: {_figure(failed)}"]
    if failed["byError"]:
        lines.append(f"  newest errors (grouped over the newest {failed['sampledNewest']:,} failed events):")
    for e in failed["byError"]:
        topics = ", ".join(e["topics"])
        lines.append(f"  {e['count']:>7,} x {e['error']!r}")
        lines.append(f"            topics {topics}; ids {e['firstId']}..{e['lastId']}; newest {e['newest']}")
    if failed["count"]:
        lines.append("  requeue with: kaireon-pub requeue --error-contains TEXT --dry-run")

    shards = doc["shards"]
    lines += ["", f"Shards: {shards['owned']} owned, {shards['unowned']} without a live lease; "
                  f"{shards['liveWorkers']} live workers"]
    for o in shards["owners"]:
        where = f"{o['hostname']} pid {o['pid']} slot {o['slot']}" if o["hostname"] else "unregistered worker"
        lines.append(f"  {o['shards']:>3} shards  {where}  ({o['workerId']})")

    parts = doc.get("partitions")
    if parts:
        lines += ["", f"Partitions ({parts['interval']}): {parts['count']}, the oldest from "
                      f"{_age(parts['oldestAgeSeconds']) if parts['oldestAgeSeconds'] is not None else '?'} ago; "
                      f"the newest ends {parts['newestEnd']}"]
        for p in parts["past"]:
            what = "dropped at the next round" if p["droppable"] else f"kept: {p['keptBecause']}"
            lines.append(f"  {p['name']}  (to {p['to']})  {what}")

    reaper = doc["reaper"]
    lines += ["", f"Reaper: {reaper['runsLastHour']} runs and {reaper['resetLastHour']:,} rows reset in the last hour"]
    for r in reaper["recent"]:
        lines.append(f"  {r['ranAt']}  {r['source']:<5} reset {r['resetCount']:,} in {r['durationMs']} ms")

    if doc["estimates"]:
        lines += ["", "Estimates: " + ", ".join(doc["estimates"])
                  + f" (counts stop at {STATUS_CAP:,}; above it: the planner's statistics, '>=' without them)"]
    lines.append(f"({doc['durationMs']} ms)")
    return "\n".join(lines)
