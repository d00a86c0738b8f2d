"""The backlog gauges (worker/backlog.py, re-exported here) and the readiness results as gauges.

The worker refreshes the backlog gauges itself and imports nothing from the operator tools; the
names stay importable from here for the others.
"""

from __future__ import annotations

from kaireon_pub import metrics
from kaireon_pub.worker.backlog import (
    FAILED_CAP,
    GROUP_CAP,
    SHARDS_PER_GROUP,
    refresh_backlog_gauges,
)

__all__ = ["FAILED_CAP", "GROUP_CAP", "SHARDS_PER_GROUP", "record_reachability", "refresh_backlog_gauges"]


def record_reachability(checks: dict[str, bool]) -> None:
    """Readiness results as gauges: {"database": bool, "broker": bool} from DefaultReadiness."""
    if "database" in checks:
        metrics.DATABASE_UP.set(1 if checks["database"] else 0)
    if "broker" in checks:
        metrics.BROKER_UP.set(1 if checks["broker"] else 0)
