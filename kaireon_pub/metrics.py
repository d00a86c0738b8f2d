"""Every metric of the tier, in one place, in prometheus-client's multiprocess mode.

PROMETHEUS_MULTIPROC_DIR must be set before this module is first imported (the supervisor does
it, and wipes the directory, before forking). Each gauge's multiprocess_mode is chosen on
purpose: `livemax` for values one process refreshes for the whole replica, `livesum` for values
that add up across workers; dead workers' files are dropped with `mark_process_dead`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

NS = "kaireon_outbox"

PENDING = Gauge(
    f"{NS}_pending_count",
    "Events in status pending (exact up to a cap, then the planner's estimate).",
    multiprocess_mode="livemax",
)
PENDING_ESTIMATED = Gauge(
    f"{NS}_pending_count_estimated",
    "1 when kaireon_outbox_pending_count is an estimate (backlog above the exact-count cap).",
    multiprocess_mode="livemax",
)
PROCESSED = Counter(
    f"{NS}_processed_total", "Events handled, by outcome (published, failed, retried).", ["outcome"]
)
EVENT_AGE = Histogram(
    f"{NS}_event_age_seconds",
    "Age of an event at its delivery report (created_at to broker acknowledgement).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
)
TICK_DURATION = Histogram(
    f"{NS}_tick_duration_seconds",
    "Duration of one worker tick (claim, produce, flush, mark).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TICK_FAILURES = Counter(
    f"{NS}_tick_failures_total", "Failed ticks, by kind.", ["transient"]
)
IN_FLIGHT = Gauge(
    f"{NS}_in_flight", "Events claimed and not yet settled.", multiprocess_mode="livesum"
)
LAST_SUCCESS = Gauge(
    f"{NS}_last_success_timestamp_seconds",
    "Unix time of the last successful tick of any worker.",
    multiprocess_mode="livemax",
)
LEASE_LOST = Counter(
    f"{NS}_lease_lost_total",
    "Events whose mark found the claim gone (reaped or handed over); they may be duplicated.",
)
PRODUCER_RECREATED = Counter(
    f"{NS}_producer_recreated_total", "Producers recreated after a fatal librdkafka error."
)
ORDER_VIOLATIONS = Counter(
    f"{NS}_order_violations_total",
    "Relaxed ordering only: events published after a later event of the same key.",
)
WORKER_RESTARTS = Counter(
    f"{NS}_worker_restarts_total", "Workers respawned by the supervisor, by reason.", ["reason"]
)
WORKERS_ALIVE = Gauge(
    f"{NS}_workers_alive", "Workers with a fresh heartbeat.", multiprocess_mode="livemax"
)
SHARDS_OWNED = Gauge(
    f"{NS}_shards_owned", "Shard leases held, by worker slot.", ["worker"], multiprocess_mode="livesum"
)
HANDOVERS = Counter(
    f"{NS}_shard_handovers_total", "Shard leases acquired or released, by direction.", ["direction"]
)
LEASE_RENEWAL_FAILURES = Counter(
    f"{NS}_lease_renewals_failed_total", "Lease renewals that failed or found leases expired."
)
REAPER_RUNS = Counter(f"{NS}_reaper_runs_total", "Reaper runs, by source (http, cli).", ["source"])
REAPER_FAILURES = Counter(f"{NS}_reaper_failures_total", "Reaper runs that failed.", ["source"])
REAPER_RESET = Counter(f"{NS}_reaper_reset_total", "Rows the reaper reset to pending.")
REAPER_DURATION = Histogram(
    f"{NS}_reaper_duration_seconds", "Duration of a reaper run.",
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
PURGED = Counter(f"{NS}_purged_total", "Published rows deleted by the retention purge.")
PURGE_DURATION = Histogram(
    f"{NS}_purge_duration_seconds", "Duration of one purge batch.",
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
