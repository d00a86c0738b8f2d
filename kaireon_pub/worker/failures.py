"""The failure streak: every failed tick classified, logged with an errorId, and acted on.

Transient failures back off (the poll interval, doubling with the transient streak up to 30 s) and
retry, non-transient ones after the poll interval; no NOTIFY cuts a back-off short (the loop's
wait_for_work), so enqueues do not make a failing tick retry at their commit rate. Non-transient
failures feed a streak that ends the worker with exit code 3 after
OUTBOX_MAX_CONSECUTIVE_FAILURES in a row. Every failed tick logs `outbox-publisher tick failed`
with `isTransient` and an `errorId` that the next attempt's line repeats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import psycopg
import psycopg_pool

from kaireon_pub import metrics
from kaireon_pub.errors import ExitCode, SystemicError, TransientError, new_error_id

log = logging.getLogger("kaireon_pub.worker")

# Migration 0009's CHECKs: the claim's UPDATE of a row written before them fails on them, as it
# failed before on the index row size (a transient error): kaireon-pub check names the row.
LONG_KEY_CHECKS = ("outbox_events_partition_key_length", "outbox_events_partition_key_bytes_length")
MIGRATE_HINT = "the schema is missing or older than this version: run `kaireon-pub migrate`"


def classify_db_error(exc: BaseException) -> bool:
    """True when a database failure is transient (retry), False when an operator must act."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return True
    if isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn,
                        psycopg.errors.UndefinedFunction, psycopg.errors.InsufficientPrivilege,
                        psycopg.errors.InvalidCatalogName, psycopg.errors.InvalidPassword,
                        psycopg.errors.InvalidAuthorizationSpecification)):
        return False
    if isinstance(exc, psycopg.OperationalError):
        text = str(exc)
        # A pooler that refuses the session's startup options (PgBouncer in transaction mode with
        # OUTBOX_POOL_MODE=session) will refuse them on every retry: an operator must act. So will
        # PgBouncer with auth_type=trust a user that is not in its auth_file.
        return not ("password authentication failed" in text or "does not exist" in text
                    or "no pg_hba.conf entry" in text or "unsupported startup parameter" in text
                    or '"trust" authentication failed' in text)
    if isinstance(exc, psycopg.errors.CheckViolation) and exc.diag.constraint_name in LONG_KEY_CHECKS:
        return True  # a row older than migration 0009 (its key over the limit): as its index error was
    if isinstance(exc, (psycopg.InterfaceError, psycopg.errors.QueryCanceled,
                        psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected,
                        psycopg.errors.LockNotAvailable)):
        return True
    return False


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, SystemicError):
        return False
    if isinstance(exc, psycopg.Error | psycopg_pool.PoolTimeout):
        return classify_db_error(exc)
    return False


async def database_refusal(connect: Callable[[], Awaitable[psycopg.AsyncConnection]]) -> BaseException | None:
    """The server's own reason for refusing a connection, or None when it accepts one."""
    try:
        conn = await connect()
    except psycopg.Error as exc:
        return exc
    await conn.close()
    return None


class FailureStreak:
    def __init__(self, max_failures: int, poll_interval_s: float,
                 probe: Callable[[], Awaitable[BaseException | None]]):
        self.max_failures = max_failures
        self.poll_interval_s = poll_interval_s
        self.probe = probe  # the server's reason for refusing a connection (database_refusal)
        self.streak = 0
        self.streak_transient = 0
        self.last_error_id: str | None = None
        # The last tick could not get a connection: the next asks the server directly first.
        self.probe_database_first = False

    async def failed(self, exc: BaseException) -> int | None:
        """Log one failed tick; the exit code when the streak ends the worker, else None."""
        if isinstance(exc, psycopg_pool.PoolTimeout):
            # The pool only says it got no connection in time; the server says why.
            self.probe_database_first = True
            exc = await self.probe() or exc
        transient = is_transient(exc)
        error_id = new_error_id()
        self.last_error_id = error_id
        metrics.TICK_FAILURES.labels("true" if transient else "false").inc()
        if transient:
            self.streak_transient += 1
        else:
            self.streak += 1
        extra = {"event": "tick failed", "errorId": error_id, "isTransient": transient,
                 "error": f"{type(exc).__name__}: {str(exc).strip()}", "consecutiveFailures": self.streak}
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn
                      | psycopg.errors.UndefinedFunction):
            extra["hint"] = MIGRATE_HINT
        log.error(
            "outbox-publisher tick failed",
            exc_info=exc if not isinstance(exc, TransientError | SystemicError | psycopg.Error
                                           | psycopg_pool.PoolTimeout) else None,
            extra=extra,
        )
        if self.streak >= self.max_failures:
            log.critical(
                f"{self.streak} consecutive non-transient failures; exiting with code 3",
                extra={"event": "giving up", "errorId": error_id, "isTransient": False,
                       **({"hint": extra["hint"]} if "hint" in extra else {})},
            )
            return ExitCode.NON_TRANSIENT
        return None

    async def probe_database(self) -> None:
        """Before a tick that follows a pool timeout: the server's refusal, raised, or the all clear."""
        reason = await self.probe()
        if reason is not None:
            raise reason
        self.probe_database_first = False

    def backoff(self) -> float:
        transient_streak = self.streak_transient
        base = self.poll_interval_s
        delay = min(base * (2 ** min(transient_streak, 5)), 30.0) if transient_streak else base
        log.info("outbox-publisher retrying tick", extra={
            "event": "tick retry", "errorId": self.last_error_id, "delaySeconds": round(delay, 3)})
        return delay

    def succeeded(self) -> None:
        if self.last_error_id:
            log.info("outbox-publisher tick recovered",
                     extra={"event": "tick recovered", "errorId": self.last_error_id})
        self.streak = 0
        self.streak_transient = 0
        self.last_error_id = None
        metrics.LAST_SUCCESS.set(time.time())
