"""/readyz's default checks: the database answers, the broker answers."""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg

from kaireon_pub import logs
from kaireon_pub.errors import new_error_id
from kaireon_pub.redact import redact
from kaireon_pub.settings import PRODUCER_DEFAULTS, Settings

log = logging.getLogger("kaireon_pub.http")

READINESS_TIMEOUT_SECONDS = 2
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
