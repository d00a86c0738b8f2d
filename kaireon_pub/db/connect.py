"""Connections of the tier's own sessions (the application's connections are its own)."""

from __future__ import annotations

import psycopg

from kaireon_pub.settings import Settings

APPLICATION_NAME = "kaireon-pub"


def session_options(settings: Settings, role: str, *, publisher: bool = False,
                    statement_timeout_ms: int | None = None) -> dict[str, object]:
    """`publisher=True` for a worker's own sessions, whose every write can be redone;
    `statement_timeout_ms` overrides OUTBOX_STATEMENT_TIMEOUT_MS (the lease keeper's is short)."""
    timeout = settings.statement_timeout_ms if statement_timeout_ms is None else statement_timeout_ms
    # A stopped worker in lock mode must not hold its row locks (its claim) for ever.
    options = (f"-c statement_timeout={timeout} "
               f"-c idle_in_transaction_session_timeout="
               f"{settings.message_timeout_ms + settings.shutdown_drain_timeout_ms + 5000}")
    if publisher:
        # A claim, mark or lease write lost in a database crash puts a row back one step, which
        # costs at most a duplicate publish (at-least-once); not waiting for the WAL flush takes
        # two fsyncs off every batch. Operator commands (requeue, reap) keep the server default.
        options += f" -c synchronous_commit={settings.synchronous_commit}"
    return {"application_name": f"{APPLICATION_NAME}:{role}", "options": options, "connect_timeout": 5}


def connect(settings: Settings, role: str, *, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(settings.database_url, autocommit=autocommit, **session_options(settings, role))
