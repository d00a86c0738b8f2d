"""`kaireon-pub migrate [--check]`, and the one report of a database that is not migrated.

The migrations themselves (files, lock, bookkeeping) are the library kaireon_pub.db.migrate; this
is its command line half. Its log lines keep the library's logger name, `kaireon_pub.db.migrate`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import psycopg

from kaireon_pub.db.connect import connect
from kaireon_pub.db.migrate import (
    Applied,
    MigrationError,
    SchemaNotReady,
    current_version,
    expected_version,
    flavour,
    migrate,
    pending,
)
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.db.migrate")


def report_not_ready(exc: SchemaNotReady, command: str) -> int:
    """One plain line on stderr and one log line saying to migrate; returns the exit code."""
    log.error(str(exc), extra={"event": "schema not migrated", "command": command,
                               "schemaVersion": exc.current, "expectedVersion": exc.expected})
    sys.stderr.write(f"{command}: {exc}\n")
    sys.stderr.flush()
    return ExitCode.SCHEMA_MISSING


def run(settings: Settings, *, check_only: bool, lock_timeout_seconds: float,
        echo: Callable[[str], None]) -> int:
    """`kaireon-pub migrate [--check]`: one stdout line per file applied, then the version."""
    def applied(done: Applied) -> None:
        m = done.migration
        how = "" if m.transactional else " (no transaction)"
        echo(f"applied {m.label}{how} in {done.seconds:.2f} s")
        log.info(f"applied migration {m.label}", extra={"event": "migration applied", "version": m.version,
                                                        "transactional": m.transactional,
                                                        "durationMs": round(done.seconds * 1000)})

    try:
        with connect(settings, "migrate") as conn:
            if check_only:
                missing = pending(conn)
                if missing:
                    current = current_version(conn)
                    return report_not_ready(SchemaNotReady(current, expected_version()), "migrate --check")
                echo(f"schema is up to date (version {current_version(conn)})")
                return ExitCode.OK
            done = migrate(conn, lock_timeout_seconds=lock_timeout_seconds, on_applied=applied,
                           partitioning=settings.partitioning,
                           on_partitions=lambda made: made and echo(f"created partitions {', '.join(made)}"))
            if settings.partitioning != "none" and flavour(conn) == "plain":
                echo(f"OUTBOX_PARTITIONING={settings.partitioning} is ignored: outbox_events is a plain table "
                     "(it applies to a fresh database; docs/operations.md says how to convert one)")
            version = current_version(conn)
    except (MigrationError, psycopg.Error) as exc:
        error_id = new_error_id()
        text = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, settings)
        if isinstance(exc, psycopg.Error):
            text = f"database error ({type(exc).__name__}): {text}"
        log.error(f"migrate failed: {text}", extra={"event": "migration failed", "errorId": error_id,
                                                   "errorType": type(exc).__name__})
        sys.stderr.write(f"migrate failed: {text} (errorId {error_id})\n")
        return ExitCode.CRASH
    if done:
        echo(f"schema is at version {version} ({len(done)} migration{'s' if len(done) != 1 else ''} applied)")
    else:
        echo(f"schema is up to date (version {version})")
        log.info(f"schema is up to date (version {version})", extra={"event": "migration none", "version": version})
    return ExitCode.OK
