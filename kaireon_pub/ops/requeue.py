"""`kaireon-pub requeue`: failed events back to pending, by id, topic, error text, or all.

Requeued rows get attempts = 0 and are due at once. They keep their place in the claim order
(their xid), which is behind the workers' cursors, so the same transaction sends the rescan
NOTIFY (delivered on commit) and the workers look back. Every call, dry run or not, writes one
audit log line (event "requeue") with who ran it, the selection and the counts.

Ordering: a requeued event is published after the later events of its key that already went
out while it sat in failed; consumers that need per-key order must tolerate that (runbook).
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from kaireon_pub.db import migrate
from kaireon_pub.db.connect import connect
from kaireon_pub.db.queries import Q
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.ops.migrate import report_not_ready
from kaireon_pub.ops.sql import OPS
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.ops.requeue")

SHOW_IDS = 20


@dataclass(frozen=True)
class Selection:
    """Which failed events; filters combine with AND. `everything` is the explicit --all."""

    ids: tuple[int, ...] = ()
    topic: str | None = None
    error_contains: str | None = None
    everything: bool = False

    def validate(self) -> str | None:
        """None when usable, else what is wrong (for a usage error)."""
        filtered = bool(self.ids) or self.topic is not None or self.error_contains is not None
        if self.everything and filtered:
            return "--all cannot be combined with --id, --topic or --error-contains"
        if not self.everything and not filtered:
            return "say which failed events: --id N (repeatable), --topic T, --error-contains TEXT, or --all"
        if self.error_contains is not None and not self.error_contains.strip():
            return "--error-contains needs a non-empty text"
        return None

    def params(self) -> dict[str, object]:
        return {"ids": list(self.ids) or None, "topic": self.topic, "error_contains": self.error_contains}

    def describe(self) -> dict[str, object]:
        if self.everything:
            return {"all": True}
        found: dict[str, object] = {}
        if self.ids:
            found["ids"] = list(self.ids)
        if self.topic is not None:
            found["topic"] = self.topic
        if self.error_contains is not None:
            found["errorContains"] = self.error_contains
        return found


@dataclass(frozen=True)
class Outcome:
    matched: int
    requeued: int
    sample_ids: list[int]


def preview(conn: psycopg.Connection, selection: Selection) -> Outcome:
    count, ids = conn.execute(OPS.requeue_preview, {**selection.params(), "show": SHOW_IDS}).fetchone()
    return Outcome(matched=count, requeued=0, sample_ids=list(ids or []))


def requeue(conn: psycopg.Connection, selection: Selection) -> list[int]:
    """Move the selected failed rows to pending in one transaction; returns their ids."""
    with conn.transaction():
        ids = [row[0] for row in conn.execute(OPS.requeue_failed, selection.params()).fetchall()]
        if ids:
            conn.execute(Q.notify_rescan)
    return sorted(ids)


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid:{os.getuid()}"


def run(settings: Settings, selection: Selection, *, dry_run: bool, yes: bool,
        confirm: Callable[[str], bool], echo: Callable[[str], None]) -> int:
    """The command: preview, confirm --all, move, report; one audit line. Returns the exit code."""
    audit: dict[str, object] = {"event": "requeue", "operator": _operator(), "host": socket.gethostname(),
                                "selection": selection.describe(), "dryRun": dry_run}
    try:
        with connect(settings, "requeue") as conn:
            migrate.require_current(conn)
            found = preview(conn, selection)
            if dry_run or found.matched == 0:
                verb = "would requeue" if dry_run else "requeued"
                echo(f"{verb} {found.matched:,} failed events{_ids_text(found.sample_ids, found.matched)}")
                log.info(f"requeue {'dry run' if dry_run else 'matched nothing'}",
                         extra={**audit, "matched": found.matched, "requeued": 0})
                return ExitCode.OK
            if selection.everything and not yes and not confirm(
                    f"Requeue ALL {found.matched:,} failed events to pending?"):
                echo("nothing requeued")
                log.info("requeue declined at the confirmation",
                         extra={**audit, "matched": found.matched, "requeued": 0, "declined": True})
                return ExitCode.CRASH
            ids = requeue(conn, selection)
    except migrate.SchemaNotReady as exc:
        return report_not_ready(exc, "requeue")
    except psycopg.Error as exc:
        error_id = new_error_id()
        log.error("requeue failed", extra={**audit, "errorId": error_id, "errorType": type(exc).__name__,
                                           "error": redact(str(exc), settings)})
        echo(f"requeue failed (errorId {error_id}); nothing was changed")
        return ExitCode.CRASH
    echo(f"requeued {len(ids):,} failed events to pending{_ids_text(ids[:SHOW_IDS], len(ids))}")
    log.info(f"requeued {len(ids)} failed events",
             extra={**audit, "matched": found.matched, "requeued": len(ids), "eventIds": ids[:1000]})
    return ExitCode.OK


def _ids_text(ids: list[int], total: int) -> str:
    if not ids:
        return ""
    more = f", ... ({total - len(ids):,} more)" if total > len(ids) else ""
    return " (ids " + ", ".join(map(str, ids)) + more + ")"
