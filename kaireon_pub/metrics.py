"""Every metric of the tier, in one place, in prometheus-client's multiprocess mode.

PROMETHEUS_MULTIPROC_DIR must be set before this module is first imported (the supervisor does it,
and clears the earlier processes' metric files from the directory, before forking). Each gauge's
multiprocess_mode is chosen on purpose: `livemax` for values one process refreshes for the whole
replica, `livesum` for values that add up across workers; dead workers' files are dropped with
`mark_process_dead`.
"""

from __future__ import annotations

import platform
from bisect import bisect_right
from collections.abc import Sequence

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
    f"{NS}_producer_recreated_total",
    "Producers recreated, by cause: fatal (a fatal librdkafka error), producer (fenced, out-of-order "
    "sequence, unknown producer id), exception (the client raised), cluster_changed (a different "
    "cluster behind the bootstrap address), stalled (batches kept timing out).",
    ["cause"],
)
UNCONFIRMED = Counter(
    f"{NS}_unconfirmed_total",
    "Events released after librdkafka had them but before a delivery report confirmed them "
    "(timeout, drain, lease end, producer recreated): their next publish may be a duplicate.",
)
HORIZON_AGE = Gauge(
    f"{NS}_horizon_age_seconds",
    "How long the oldest open transaction the claim waits for has been open (0: it waits for none).",
    multiprocess_mode="livemax",
)
HORIZON_BYPASSED = Counter(
    f"{NS}_horizon_bypassed_total",
    "Transactions the claim stopped waiting for after OUTBOX_HORIZON_MAX_WAIT_MS (their rows are "
    "rescanned when they end), counted by each worker that passed them.",
)
FOREIGN_RESTAMPED = Counter(
    f"{NS}_foreign_rows_restamped_total",
    "Pending rows whose xid came from another cluster (a restore, COPY, replication), re-stamped to publish.",
)
FROZEN_OWNERS_TERMINATED = Counter(
    f"{NS}_frozen_owner_sessions_terminated_total",
    "Sessions of expired lease owners that still held lease locks (a worker frozen mid-claim), ended.",
)
CLAIM_LOCK_CONFLICTS = Counter(
    f"{NS}_claim_lock_conflicts_total",
    "Claims that met a pending event locked by another session (an application's or an operator's "
    "open transaction) and were made again stepping around it.",
)
LOCKED_EVENTS = Gauge(
    f"{NS}_locked_events",
    "Pending events another session keeps locked, each holding the later events of its key.",
    multiprocess_mode="livesum",
)
ORDER_VIOLATIONS = Counter(
    f"{NS}_order_violations_total",
    "Relaxed ordering only: events that went into a retry, or that another session kept locked, while "
    "later events of their key flowed on.",
)
# The dead-letter sweep (OUTBOX_DEAD_LETTER_TOPIC, worker/deadletter.py).
DEAD_LETTERED = Counter(
    f"{NS}_dead_lettered_total", "Failed events whose dead-letter record was acknowledged and whose row was marked."
)
DEAD_LETTER_ERRORS = Counter(
    f"{NS}_dead_letter_errors_total",
    "Dead-letter records not acknowledged (refused, timed out, purged) and dead-letter sweeps that failed; "
    "their events are produced again at the next sweep.",
)
DEAD_LETTER_UNMARKED = Counter(
    f"{NS}_dead_letter_unmarked_total",
    "Dead-letter records acknowledged whose row was no longer waiting at the mark (dead-lettered by another "
    "worker across a handover, requeued or purged meanwhile): the event may have two dead-letter records.",
)
DEAD_LETTER_WAITING = Gauge(
    f"{NS}_dead_letter_waiting",
    "Failed events whose dead-letter record a worker's sweep had refused and has not got acknowledged since; "
    "above 0 for long: the dead-letter topic refuses them.",
    multiprocess_mode="livesum",
)
WORKER_RESTARTS = Counter(
    f"{NS}_worker_restarts_total", "Workers respawned by the supervisor, by reason.", ["reason"]
)
SIDE_TASK_DEATHS = Counter(
    f"{NS}_side_task_deaths_total",
    "A worker's side tasks (lease keeper, broker watch, gauges, purge, ...) that raised, by task: restarted after "
    "a back-off, or, the lease keeper, the worker stopped.",
    ["task"],
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
# The partitioned outbox (OUTBOX_PARTITIONING): refreshed by worker 0's partition maintenance.
PARTITIONS = Gauge(f"{NS}_partitions", "Partitions of a partitioned outbox_events (0 on a plain table).",
                   multiprocess_mode="livemax")
OLDEST_PARTITION_AGE = Gauge(
    f"{NS}_oldest_partition_age_seconds",
    "Age of the oldest partition's range start: grows while a partition is kept (a pending, processing "
    "or recently failed row in it).",
    multiprocess_mode="livemax",
)
PARTITIONS_DROPPED = Counter(f"{NS}_partitions_dropped_total", "Partitions dropped by partition retention.")
# The continuous auditor (OUTBOX_AUDIT_SAMPLE_PER_MINUTE, worker/auditor.py): each worker's samples.
AUDIT_CHECKED = Counter(
    f"{NS}_audit_checked_total",
    "Published events the continuous auditor read back at their recorded partition and offset and compared.",
)
AUDIT_FINDINGS = Counter(
    f"{NS}_audit_findings_total",
    "Continuous auditor findings, by kind: missing (no record at the recorded position), altered (the event's "
    "key or value differs), other_event (another event's record at the position).",
    ["kind"],
)
AUDIT_ERRORS = Counter(
    f"{NS}_audit_errors_total",
    "Continuous auditor passes that could not read the broker or the database (not findings; retried a minute later).",
)

# ---- operator gauges -----------------------------------------------------------------------
# The backlog figures are refreshed by worker slot 0 through kaireon_pub.ops.gauges (one process
# per replica writes them, the others export their initial 0), hence livemax: the refreshing
# process's value wins and disappears with it when it dies.
SHARD_GROUPS = 16  # pending per shard group: 256 shards in 16 groups of 16, bounded cardinality
OLDEST_PENDING_AGE = Gauge(
    f"{NS}_oldest_pending_age_seconds",
    "Age of the oldest pending event (the oldest head of the 256 shards' claim order).",
    multiprocess_mode="livemax",
)
FAILED_COUNT = Gauge(
    f"{NS}_failed_count",
    "Events in status failed, parked until requeued (exact up to a cap of 100000).",
    multiprocess_mode="livemax",
)
PENDING_BY_SHARD_GROUP = Gauge(
    f"{NS}_pending_by_shard_group",
    "Pending events per group of 16 shards (group g = shards 16g..16g+15), exact up to 1000 per group.",
    ["group"],
    multiprocess_mode="livemax",
)
OLDEST_PENDING_AGE_BY_SHARD_GROUP = Gauge(
    f"{NS}_oldest_pending_age_by_shard_group_seconds",
    "Age of the oldest pending event per group of 16 shards; a lagging shard shows here first.",
    ["group"],
    multiprocess_mode="livemax",
)
# Each worker reports its own producer's local queue; the replica's depth is their sum.
PRODUCER_QUEUE_DEPTH = Gauge(
    f"{NS}_producer_queue_depth",
    "Messages in the producers' local queues, produced and not yet acknowledged by the broker.",
    multiprocess_mode="livesum",
)
# Written by the HTTP process on its own clock (every 5 s, whether or not /readyz is called) and by worker 0.
DATABASE_UP = Gauge(
    f"{NS}_database_up",
    "1 when the last readiness check reached the database, else 0 (0 until the first check).",
    multiprocess_mode="livemax",
)
BROKER_UP = Gauge(
    f"{NS}_broker_up",
    "1 when the last readiness check reached the broker, else 0 (0 until the first check).",
    multiprocess_mode="livemax",
)
# What runs, for a dashboard's version panel and an alert on a mixed rollout. Every process writes
# the same single series; livemax shows it once, as long as one process of the replica lives.
BUILD_INFO = Gauge(
    f"{NS}_build_info",
    "Always 1; the labels say what runs: the tier's version, Python's and librdkafka's.",
    ["version", "python", "librdkafka"],
    multiprocess_mode="livemax",
)


def build_labels() -> dict[str, str]:
    """The labels of kaireon_outbox_build_info: this package's version, Python's, librdkafka's."""
    from importlib.metadata import PackageNotFoundError, version

    from confluent_kafka import libversion

    try:
        tier = version("kaireon-pub")
    except PackageNotFoundError:  # a checkout that is not installed
        tier = "unknown"
    return {"version": tier, "python": platform.python_version(), "librdkafka": libversion()[0]}


BUILD_INFO.labels(**build_labels()).set(1)
# The group label values are known and few: create them up front so every series exists from
# the first scrape (the dashboard and alerts need no `or vector(0)`).
for _group in range(SHARD_GROUPS):
    PENDING_BY_SHARD_GROUP.labels(str(_group))
    OLDEST_PENDING_AGE_BY_SHARD_GROUP.labels(str(_group))
# Likewise every labelled counter's known values: increase() and rate() need a 0 to start from,
# or a panel shows "No data" and an alert misses the first event.
for _outcome in ("published", "failed", "retried"):
    PROCESSED.labels(_outcome)
for _transient in ("true", "false"):
    TICK_FAILURES.labels(_transient)
for _reason in ("crash", "exit", "killed", "hung"):
    WORKER_RESTARTS.labels(_reason)
for _cause in ("fatal", "producer", "exception", "cluster_changed", "stalled"):
    PRODUCER_RECREATED.labels(_cause)
for _direction in ("acquired", "released"):
    HANDOVERS.labels(_direction)
for _source in ("http", "cli"):
    REAPER_RUNS.labels(_source)
    REAPER_FAILURES.labels(_source)
for _kind in ("missing", "altered", "other_event"):
    AUDIT_FINDINGS.labels(_kind)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """Histogram.observe for a whole batch: one write per touched bucket instead of one per value.

    In multiprocess mode every write is a locked mmap update, and a batch of 1,000 events made
    per-event observe() a visible share of a worker's CPU. Uses the unlabelled histogram's
    bucket values as observe() does (client_python 0.x); falls back to observe() if they change.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    # observe() counts a value in the first bucket whose bound is ≥ it: bucket i gets the values
    # in (bound i-1, bound i], read off the values sorted (in C) with one bisect per bound.
    ordered = sorted(values)
    below = 0
    for bucket, bound in zip(buckets, bounds, strict=True):
        upto = bisect_right(ordered, bound)
        if upto > below:
            bucket.inc(upto - below)
            below = upto
    total.inc(sum(values))
