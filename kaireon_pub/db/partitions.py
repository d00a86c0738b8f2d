"""The partitioned outbox (OUTBOX_PARTITIONING=hourly|daily): partitions made ahead, retention by
dropping whole partitions, never one that still holds a row that has to be published.

`outbox_events` is range-partitioned on `created_at` (UTC boundaries; `outbox_events_pYYYYMMDDHH`
hourly, `outbox_events_pYYYYMMDD` daily). The claim, the horizon and the ordering rules do not
look at partitions: the claim reads the parent, per shard in (xid, id) order, whatever partition a
row is in, so per-key order holds across a partition boundary.

A partition is dropped only when all of these hold (`verdict`):
- its range has ended (created_at defaults to clock_timestamp() at insert: nothing new lands in it);
- it holds no `pending` and no `processing` row, whatever its age;
- its newest `published_at` is older than OUTBOX_RETENTION_SECONDS (0: nothing is dropped);
- it holds no `failed` row, or the newest one failed longer ago than OUTBOX_FAILED_RETENTION_SECONDS
  (0: a partition with a failed row is kept).

The drop (`retire`), in steps that each leave a safe state behind if interrupted:
1. read the partition's state without a lock: most partitions stop here (kept);
2. one transaction: `ADD CONSTRAINT outbox_events_retiring CHECK (false) NOT VALID` (its ACCESS
   EXCLUSIVE lock on the partition only waits for every transaction that wrote the partition; from
   its commit on no row can be inserted into or updated in the partition), then the state read
   again, now seeing every row committed before the lock: still droppable → commit; else roll back
   (nothing changed);
3. `DETACH PARTITION … CONCURRENTLY` (no lock that blocks enqueue or the claim);
4. the state read a third time, then `DROP TABLE` (if the impossible happened, the table is
   attached back and the workers told to rescan).

One job past 300 lines: these steps and the verdict are one safety argument, read best in one file.
An interrupted step 3 leaves the partition "detach pending" (finalized on the next round); an
interrupted step 4 leaves a detached table carrying the constraint (dropped on the next round).
Through a transaction pooler (a PooledConnection: OUTBOX_POOL_MODE=transaction without
OUTBOX_LISTEN_DATABASE_URL) step 3 cannot run, so no partition is frozen there: each one that may go
is kept with CANNOT_DETACH, and a freeze an earlier round left (a permanent CHECK (false)) is undone.
A restore that writes old created_at values gets an error for a retiring or dropped range (no
partition takes the row): nothing is kept where retention would drop it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
import psycopg.errors
from psycopg import sql

from kaireon_pub.db.connect import PooledConnection
from kaireon_pub.db.queries import load

log = logging.getLogger("kaireon_pub.db.partitions")

P = load("partitions.sql")

INTERVALS = {"hourly": timedelta(hours=1), "daily": timedelta(days=1)}
# Partitions made ahead of the current one: how long the tier may be down before an insert finds
# no partition. Every partition costs every claim one index probe per shard (the claim cannot
# prune: it does not filter on created_at), so few are kept ahead.
AHEAD = {"hourly": 6, "daily": 2}
LOCK_TIMEOUT_MS = 2000  # the freeze's wait for a partition's writers; then it is tried next round
CANNOT_DETACH = ("DETACH PARTITION … CONCURRENTLY cannot run through a transaction pooler: set "
                 "OUTBOX_LISTEN_DATABASE_URL to the server itself (README, Through PgBouncer)")


@dataclass(frozen=True)
class Partition:
    name: str
    lower: datetime | None
    upper: datetime | None
    detach_pending: bool = False
    retiring: bool = False
    rows: int = -1
    bytes: int = 0


@dataclass(frozen=True)
class State:
    pending: bool
    processing: bool
    last_published: datetime | None
    failed: bool
    last_failed: datetime | None
    now: datetime


@dataclass
class Report:
    """What one maintenance round did (or, with dry_run, would do)."""

    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def is_partitioned(conn: psycopg.Connection) -> bool:
    return bool(conn.execute(P.is_partitioned).fetchone()[0])


def owns_outbox(conn: psycopg.Connection) -> bool:
    """Whether the session's role may make and drop partitions (it owns outbox_events, or is a
    member of its owner)."""
    row = conn.execute(P.owns_outbox).fetchone()
    return bool(row and row[0])


def list_partitions(conn: psycopg.Connection) -> list[Partition]:
    return [Partition(*row) for row in conn.execute(P.list_partitions).fetchall()]


def infer_interval(partitions: list[Partition], configured: str = "none") -> str:
    """OUTBOX_PARTITIONING when set, else the span of the newest regular partition (default hourly)."""
    if configured in INTERVALS:
        return configured
    for p in reversed(partitions):
        if p.lower is not None and p.upper is not None:
            return "daily" if p.upper - p.lower >= timedelta(days=1) else "hourly"
    return "hourly"


def floor(moment: datetime, interval: str) -> datetime:
    moment = moment.astimezone(UTC)
    if interval == "daily":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(minute=0, second=0, microsecond=0)


def partition_name(lower: datetime, interval: str) -> str:
    return "outbox_events_p" + lower.astimezone(UTC).strftime("%Y%m%d" if interval == "daily" else "%Y%m%d%H")


def _q(text: str, **names: str | datetime) -> sql.Composed:
    return sql.SQL(text).format(**{k: sql.Identifier(v) if isinstance(v, str) else sql.Literal(v)
                                   for k, v in names.items()})


def _now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def create_ahead(conn: psycopg.Connection, interval: str, *, ahead: int | None = None,
                 dry_run: bool = False) -> list[str]:
    """The partitions from the current one to `ahead` intervals after it; returns the names made.

    Starts at the newest partition's end (or at the current interval when there is none or it
    ended): a range is never made twice, and a change of interval simply goes on from there.
    """
    step = INTERVALS[interval]
    ahead = AHEAD[interval] if ahead is None else ahead
    now = _now(conn)
    existing = list_partitions(conn)
    uppers = [p.upper for p in existing if p.upper is not None]
    if any(p.upper is None for p in existing):
        return []  # a partition up to MAXVALUE: nothing can be added after it
    current = floor(now, interval)
    start = max([current, *uppers])
    until = current + step * (ahead + 1)
    made = []
    lower = start
    while lower < until:
        upper = floor(lower + step, interval)  # aligned from the first one on
        name = partition_name(lower, interval)
        if not dry_run:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                conn.execute(_q(P.create_partition, partition=name))
                conn.execute(_q(P.attach_partition, partition=name, lower=lower, upper=upper))
            log.info(f"partition {name} created", extra={"event": "partition created", "partition": name,
                                                        "lower": lower.isoformat(), "upper": upper.isoformat()})
        made.append(name)
        lower = upper
    return made


def state(conn: psycopg.Connection, name: str) -> State:
    return State(*conn.execute(_q(P.partition_state, partition=name)).fetchone())


def verdict(p: Partition, s: State, *, retention_seconds: int, failed_retention_seconds: int) -> str | None:
    """Why the partition must stay, or None when it may be dropped."""
    if p.upper is None or p.upper > s.now:
        return "its range has not ended"
    if s.pending:
        return "it holds pending rows"
    if s.processing:
        return "it holds processing rows"
    if retention_seconds <= 0:
        return "retention is off (OUTBOX_RETENTION_SECONDS=0)"
    if s.last_published is not None and s.last_published > s.now - timedelta(seconds=retention_seconds):
        return "rows published within OUTBOX_RETENTION_SECONDS"
    if s.failed:
        if failed_retention_seconds <= 0:
            return "it holds failed rows (OUTBOX_FAILED_RETENTION_SECONDS=0 keeps them)"
        if s.last_failed is not None and s.last_failed > s.now - timedelta(seconds=failed_retention_seconds):
            return "rows failed within OUTBOX_FAILED_RETENTION_SECONDS"
    return None


def can_detach(conn: psycopg.Connection) -> bool:
    """Whether DETACH … CONCURRENTLY can run on `conn`: not on a transaction pooler's connection,
    whose autocommit statement shares an implicit transaction with the session settings."""
    return not isinstance(conn, PooledConnection)


def retire(conn: psycopg.Connection, p: Partition, *, retention_seconds: int, failed_retention_seconds: int,
           dry_run: bool = False) -> str | None:
    """Drop `p` if it may go (see the module docstring); returns why it stays, or None when dropped.

    `conn` must be in autocommit mode (DETACH CONCURRENTLY runs outside a transaction block).
    """
    def why() -> str | None:
        return verdict(p, state(conn, p.name), retention_seconds=retention_seconds,
                       failed_retention_seconds=failed_retention_seconds)

    detachable = can_detach(conn)
    if not detachable and p.retiring and not p.detach_pending and not dry_run:
        with conn.transaction():  # frozen by an earlier round that could not detach it: undone
            conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
            conn.execute(_q(P.unretire_partition, partition=p.name))
    reason = why()  # 1. without a lock
    if reason is None and not detachable and not p.detach_pending:
        return CANNOT_DETACH  # never frozen here: it could not be detached
    if reason is not None or dry_run:
        return reason
    if not p.retiring and not p.detach_pending:
        with conn.transaction():  # 2. freeze, then look again under the lock
            conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
            conn.execute(_q(P.retire_partition, partition=p.name))
            reason = why()
            if reason is not None:
                raise _Keep(reason)  # rolls the constraint back
    # 3. bounded by the session's statement timeout; cut short, it is finalized next round
    if p.detach_pending:
        conn.execute(_q(P.finalize_detach, partition=p.name))
    else:
        conn.execute(_q(P.detach_partition, partition=p.name))
    reason = why()  # 4. the last look, the table now apart
    if reason is not None:
        _attach_back(conn, p)
        return reason
    conn.execute(_q(P.drop_detached, partition=p.name))
    return None


class _Keep(Exception):
    """Raised inside the freeze transaction to roll it back: the partition stays."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _attach_back(conn: psycopg.Connection, p: Partition) -> None:
    log.error(f"partition {p.name} held rows to publish after it was frozen; attached back",
              extra={"event": "partition kept", "partition": p.name})
    with conn.transaction():
        conn.execute(_q(P.unretire_partition, partition=p.name))
        conn.execute(_q(P.attach_partition, partition=p.name, lower=p.lower, upper=p.upper))
        conn.execute("SELECT pg_notify('kaireon_outbox_rescan', '')")  # its rows were out of sight


def maintain(conn: psycopg.Connection, *, interval: str, retention_seconds: int, failed_retention_seconds: int,
             ahead: int | None = None, create: bool = True, drop: bool = True, dry_run: bool = False,
             on_drop: Callable[[str], None] | None = None) -> Report:
    """One round: finish interrupted retirements, make partitions ahead, drop the ones that may go."""
    report = Report()
    if drop:
        for (name,) in conn.execute(P.detached_leftovers).fetchall():
            try:
                s = state(conn, name)
                if s.pending or s.processing:
                    report.errors.append(f"{name}: a detached table still holds rows to publish; left alone")
                    continue
                if not dry_run:
                    conn.execute(_q(P.drop_detached, partition=name))
                    if on_drop:
                        on_drop(name)
                report.dropped.append(name)
            except psycopg.Error as exc:
                report.errors.append(f"{name}: {_one_line(exc)}")
    if create:
        try:
            report.created = create_ahead(conn, interval, ahead=ahead, dry_run=dry_run)
        except psycopg.Error as exc:
            report.errors.append(f"creating partitions: {_one_line(exc)}")
    if drop:
        for p in list_partitions(conn):
            started = time.monotonic()
            try:
                reason = retire(conn, p, retention_seconds=retention_seconds,
                                failed_retention_seconds=failed_retention_seconds, dry_run=dry_run)
            except _Keep as keep:
                reason = keep.reason
            except psycopg.Error as exc:
                report.errors.append(f"{p.name}: {_one_line(exc)}")
                continue
            if reason is None:
                if dry_run:
                    report.dropped.append(p.name)
                    continue
                report.dropped.append(p.name)
                log.info(f"partition {p.name} dropped", extra={
                    "event": "partition dropped", "partition": p.name,
                    "durationMs": round((time.monotonic() - started) * 1000)})
                if on_drop:
                    on_drop(p.name)
            elif p.upper is not None and p.upper <= _now(conn):
                report.kept[p.name] = reason
    return report


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
