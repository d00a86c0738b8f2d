"""/readyz's default checks (the database answers, the broker answers) and the cache that runs
them on a clock of its own, so that no request to /readyz opens a connection."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from kaireon_pub import logs
from kaireon_pub.errors import new_error_id
from kaireon_pub.redact import redact
from kaireon_pub.settings import PRODUCER_DEFAULTS, Settings

log = logging.getLogger("kaireon_pub.http")

READINESS_TIMEOUT_SECONDS = 2
# How often the cached readiness checks again; kubelet's probes read the last answer meanwhile.
REFRESH_SECONDS = 5.0
# How long the first /readyz waits for the first check (each check is bounded by ~2 s).
FIRST_CHECK_WAIT_SECONDS = 2 * READINESS_TIMEOUT_SECONDS + 1
# Producer-only settings: an admin client does not need them (and idempotence would make it
# request a producer id from the broker on every readiness check).
_ADMIN_EXCLUDED = frozenset(PRODUCER_DEFAULTS) - {"bootstrap.servers"}


class DefaultReadiness:
    """{"database": SELECT 1 answers, "broker": metadata request answers}, each within ~2 s.

    The admin client is made on first use in the process that serves (never at import or
    before a fork) and reused: librdkafka keeps its broker connections warm between probes.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._admin: Any = None
        self._admin_lock = threading.Lock()

    def __call__(self) -> dict[str, bool]:
        from kaireon_pub.ops.gauges import record_reachability

        checks = {"database": self.database(), "broker": self.broker()}
        record_reachability(checks)
        return checks

    def database(self) -> bool:
        try:
            # No startup options through a transaction pooler.
            from kaireon_pub.db.connect import probe_options

            with psycopg.connect(self.settings.database_url, autocommit=True,
                                 **probe_options(self.settings, "readyz", READINESS_TIMEOUT_SECONDS)) as conn:
                conn.execute("SELECT 1").fetchone()
            return True
        except Exception as exc:
            self._log_check_failure("database", exc)
            return False

    def broker(self) -> bool:
        try:
            with self._admin_lock:
                if self._admin is None:
                    from confluent_kafka.admin import AdminClient

                    config: dict[str, object] = {k: v for k, v in self.settings.producer_config.items()
                                                 if k not in _ADMIN_EXCLUDED}
                    config["logger"] = logs.librdkafka_logger()
                    self._admin = AdminClient(config)
                admin = self._admin
            try:
                admin.list_topics(timeout=READINESS_TIMEOUT_SECONDS)
            finally:
                admin.poll(0)  # hands librdkafka's queued log lines to our logger
            return True
        except Exception as exc:
            self._log_check_failure("broker", exc)
            return False

    def _log_check_failure(self, check: str, exc: Exception) -> None:
        log.warning(f"readiness check {check} failed",
                    extra={"event": "readyz check failed", "errorId": new_error_id(), "check": check,
                           "errorType": type(exc).__name__, "error": redact(str(exc), self.settings)})


class CachedReadiness:
    """/readyz's answer from the last check, refreshed by a thread of its own every
    `interval` seconds: a probe (kubelet's, or anyone's: the route is unauthenticated) costs no
    database connection and no broker request, however often it comes.

    The thread starts on first use or at `start()`, in the process that serves (after the fork),
    and ends at `stop()`. The first answer waits for the first check (at most `first_wait` s);
    a check that raised is raised again, as `ReadinessUnknown`, to every caller until the next.
    """

    def __init__(self, check: Callable[[], Mapping[str, bool]], interval: float | None = None,
                 first_wait: float = FIRST_CHECK_WAIT_SECONDS):
        self.check = check
        self.interval = REFRESH_SECONDS if interval is None else interval
        self.first_wait = first_wait
        self.refreshes = 0  # checks run so far (for tests and the curious)
        self._result: dict[str, bool] | None = None
        self._error: str | None = None
        self._checked = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="readyz-refresh", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Ends the thread; a check in progress is waited for `timeout` s at most (a daemon thread)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __call__(self) -> dict[str, bool]:
        self.start()
        self._checked.wait(self.first_wait)
        with self._lock:
            result, error = self._result, self._error
        if error is not None:
            raise ReadinessUnknown(error)
        return dict(result or {})  # no check finished yet: not ready

    def refresh(self) -> None:
        """One check, its result kept for the callers."""
        try:
            result, error = {str(k): bool(v) for k, v in dict(self.check()).items()}, None
        except Exception as exc:
            result, error = None, f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._result, self._error = result, error
            self.refreshes += 1
        self._checked.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval)


class ReadinessUnknown(Exception):
    """The last readiness check raised instead of answering."""
