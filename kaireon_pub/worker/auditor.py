"""The continuous auditor (OUTBOX_AUDIT_SAMPLE_PER_MINUTE, off by default): each worker reads a
sample of the events its shards published back from the broker, at the partition and offset their
marks recorded, and compares each record with its row (kaireon_pub/audit/compare.py).

Pace: N a minute, spread evenly: a pass every 60/N s (every 100 ms at most: above 600 a minute a
pass takes several rows), the fractions carried over so a minute holds N samples, not a burst.
The reads go one at a time (about 12 ms each against the tests' Kafka): near 5,000 a minute they,
not the setting, set the pace (measured: about 5,000 checked at 6,000 a minute).
The sample (auditor.sql's audit_sample): rows published in the last hour (at most the retention)
but not in the last SETTLE_S seconds (with acks=1 a just-acknowledged record may sit above the
high watermark for a moment: never a false `missing`), of the worker's leased shards, with a
recorded position, from a random point of that window; a bounded walk of the partial index of
published rows (EXPLAIN in the statement's comment).

Per sample, one of:
- checked (kaireon_outbox_audit_checked_total): the broker answered for the position;
- a finding (kaireon_outbox_audit_findings_total{kind}): `missing` (the topic or the partition is
  not on the broker: deleted; or the partition holds no record there: below its log start, past its
  end, or a gap; on a compacted topic, see below), `altered` (this event, its key or value not
  the bytes the tier produced), `other_event` (another event's record sits there); one log line,
  event "audit finding", with an errorId, the event id, topic, partition, offset and kind. Each
  finding once per worker: sampled again, it is checked, not counted or logged again (the last
  REPORTED_KEPT findings are remembered);
- an error (kaireon_outbox_audit_errors_total): the broker or the database could not be read. Not
  a finding: the pass ends there and the auditor tries again a minute later.

Each topic's partitions are asked once a pass (before its first read: a deleted topic is `missing`
at once, not a read timing out), its cleanup.policy once in POLICY_TTL_S. On a compacted topic the
broker removes a record superseded by a later one of its key: a position below the partition's
high watermark that holds no record is checked, not a finding (a single read cannot tell
compaction from loss there; `kaireon-pub audit`, which reads the key's later records, can). At or
above the high watermark it is `missing`: compaction never lowers it.

It never slows publishing: its own consumer (audit/broker.py's RecordReader, made lazily in the
worker's process, after the fork), used from one thread of its own, each read bounded in time;
one short statement on the worker's pool per pass. The task closes the reader when it stops.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import random
import time
from collections.abc import Callable, Collection
from typing import Any

import psycopg_pool

from kaireon_pub import metrics
from kaireon_pub.audit import compare as cmp
from kaireon_pub.db.queries import int_array, load
from kaireon_pub.errors import new_error_id
from kaireon_pub.settings import Settings
from kaireon_pub.worker.rows import Row

log = logging.getLogger("kaireon_pub.worker.auditor")

A = load("auditor.sql")

SHARDS = 256
MAX_PASSES_PER_MINUTE = 600  # a pass every 100 ms at most; above 600 samples a minute, several per pass
WINDOW_S = 3600  # "recently published": the last hour, or the retention when it is shorter
SCAN_SLACK = 4  # index entries walked per wanted row, times the shards' share (keys spread unevenly)
SCAN_MAX = 5000  # at most this many index entries per branch of the statement
READ_TIMEOUT_S = 5.0  # one record's read back from the broker
ERROR_PAUSE_S = 60.0  # after a failed pass: the next minute
ERROR_LOG_EVERY_S = 60.0  # an unreadable broker is logged once a minute, not once a sample
SETTLE_S = 5  # rows published in the last 5 s are not sampled (acks=1: the high watermark may lag)
POLICY_TTL_S = 300.0  # a topic's cleanup.policy is read again after this
REPORTED_KEPT = 10_000  # findings remembered, so that one is counted and logged once, not at every sample

KINDS = ("missing", "altered", "other_event")
_KIND_OF = {cmp.ALTERED: "altered", cmp.NOT_THIS_EVENT: "other_event"}


def pass_interval(per_minute: int) -> float:
    """Seconds between passes: 60/N, at least 60/MAX_PASSES_PER_MINUTE."""
    return 60.0 / min(per_minute, MAX_PASSES_PER_MINUTE)


def scan_size(wanted: int, owned: int) -> int:
    """Index entries a branch of audit_sample walks to find `wanted` rows of `owned` of the 256 shards."""
    return max(1, min(SCAN_MAX, wanted * SCAN_SLACK * SHARDS // max(1, owned)))


def window_seconds(settings: Settings) -> int:
    if settings.retention_seconds > 0:
        return min(WINDOW_S, settings.retention_seconds)
    return WINDOW_S


def classify(row: Row, record: Any, cloudevents_source: str | None) -> str | None:
    """The finding's kind for the record read at the row's position (None: no record), or None when equal."""
    if record is None:
        return "missing"
    finding = cmp.compare(row, record, cloudevents_source)
    return None if finding is None else _KIND_OF[finding.kind]


class Auditor:
    """One worker's auditor. `owned()` gives the worker's leased shards at the moment of a pass;
    `reader_factory()` makes the RecordReader (called in the reader's thread, on first use)."""

    def __init__(self, settings: Settings, pool: psycopg_pool.AsyncConnectionPool,
                 owned: Callable[[], Collection[int]], *, reader_factory: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random):
        self.per_minute = settings.audit_sample_per_minute
        self.interval = pass_interval(self.per_minute)
        self.per_pass = self.per_minute * self.interval / 60.0
        self.window = window_seconds(settings)
        self.cloudevents_source = settings.cloudevents_source if settings.cloudevents else None
        self.pool = pool
        self.owned = owned
        self._reader_factory = reader_factory or (lambda: _record_reader(settings))
        self._lane: _ReaderLane | None = None
        self._clock = clock
        self._rand = rand
        self._owed = 0.0
        self._last_error_log = -float("inf")
        self._policies: dict[str, tuple[bool, float]] = {}  # topic -> (compacted, read at); the lane's thread
        self._reported: collections.OrderedDict[tuple[int, str, int, int], None] = collections.OrderedDict()
        self.first_pause = rand() * self.interval  # workers' passes spread over the interval

    # ---- one pass ----------------------------------------------------------------------------

    async def once(self) -> float:
        """One pass: sample the rows owed, read each back and compare. Returns the pause before the next."""
        started = self._clock()
        shards = sorted(self.owned())
        self._owed = min(self._owed + self.per_pass, max(1.0, 2 * self.per_pass))
        wanted = int(self._owed)
        if not shards or wanted == 0:
            return self.interval
        try:
            rows = await self.sample(shards, wanted)
        except Exception as exc:  # noqa: BLE001 - a failed pass is counted and tried again a minute later
            return self._failed(exc, "the database")
        self._owed -= len(rows) if rows else wanted  # nothing to audit yet: the owed samples lapse
        known: dict[str, list[int] | None] = {}  # each topic's partitions, asked once a pass
        for row, partition, offset in rows:
            try:
                record, compacted = await self._in_thread(self._look, row.topic, partition, offset, known)
            except Exception as exc:  # noqa: BLE001 - the broker could not be read: not a finding
                return self._failed(exc, "the broker")
            self.report(row, partition, offset, None if compacted else classify(row, record, self.cloudevents_source))
        return max(0.0, self.interval - (self._clock() - started))

    async def sample(self, shards: list[int], wanted: int) -> list[tuple[Row, int, int]]:
        params = {"n": wanted, "scan": scan_size(wanted, len(shards)), "shards": int_array(shards),
                  "window": self.window, "at": self._rand(), "settle": SETTLE_S}
        async with self.pool.connection(timeout=5) as conn:
            cur = await conn.execute(A.audit_sample, params)
            fetched = await cur.fetchall()
        seen: set[int] = set()
        rows = []
        for r in fetched:
            if r[0] not in seen:
                seen.add(r[0])
                rows.append((Row(*r[:13]), r[13], r[14]))
        return rows

    def report(self, row: Row, partition: int, offset: int, kind: str | None) -> None:
        """Count one sample checked and, for a finding not reported yet, count it and log it."""
        metrics.AUDIT_CHECKED.inc()
        if kind is None:
            return
        finding = (row.id, kind, partition, offset)
        if finding in self._reported:
            self._reported.move_to_end(finding)
            return
        self._reported[finding] = None
        if len(self._reported) > REPORTED_KEPT:
            self._reported.popitem(last=False)
        metrics.AUDIT_FINDINGS.labels(kind).inc()
        log.error(f"audit finding: event {row.id} at {row.topic}[{partition}]@{offset}: {kind}",
                  extra={"event": "audit finding", "errorId": new_error_id(), "eventId": row.id,
                         "topic": row.topic, "partition": partition, "offset": offset, "kind": kind})

    def _failed(self, exc: Exception, what: str) -> float:
        metrics.AUDIT_ERRORS.inc()
        now = self._clock()
        if now - self._last_error_log >= ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.warning(f"audit: {what} could not be read: {type(exc).__name__}: {exc}; trying again in "
                        f"{ERROR_PAUSE_S:.0f} s",
                        extra={"event": "audit failed", "errorId": new_error_id(), "isTransient": True})
        return ERROR_PAUSE_S

    # ---- the reader, in a thread of its own -----------------------------------------------------

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._lane is None:
            self._lane = _ReaderLane(self._reader_factory)
        return await asyncio.get_running_loop().run_in_executor(self._lane.thread, fn, self._lane, *args)

    def _look(self, lane: _ReaderLane, topic: str, partition: int, offset: int,
              known: dict[str, list[int] | None]) -> tuple[Any, bool]:
        """(the record at the position or None, whether its absence is a compacted topic's gap)."""
        reader = lane.reader()
        if topic not in known:
            known[topic] = reader.partitions(topic, timeout=READ_TIMEOUT_S)
        if known[topic] is None or partition not in known[topic]:  # type: ignore[operator]
            return None, False  # the topic or partition is not on the broker: missing
        record = reader.read_at(topic, partition, offset, timeout=READ_TIMEOUT_S)
        if record is not None or not self._compacted(reader, topic):
            return record, False
        return None, offset < reader.watermarks(topic, partition, timeout=READ_TIMEOUT_S)[1]

    def _compacted(self, reader: Any, topic: str) -> bool:  # in the lane's thread
        policy = self._policies.get(topic)
        if policy is None or self._clock() - policy[1] >= POLICY_TTL_S:
            policy = self._policies[topic] = (reader.compacted(topic, timeout=READ_TIMEOUT_S), self._clock())
        return policy[0]

    def close(self) -> None:
        """Close the reader after the read in flight, if any; never blocks."""
        lane, self._lane = self._lane, None
        if lane is not None:
            lane.close()

    # ---- the task ----------------------------------------------------------------------------

    async def run(self, stopping: Callable[[], bool]) -> None:
        """The task: a first pause spread over the interval, then passes until the worker stops."""
        from kaireon_pub.worker.lifecycle import every

        try:
            await asyncio.sleep(self.first_pause)
            await every(self.once, stopping)
        finally:
            self.close()


class _ReaderLane:
    """A RecordReader and the one thread that uses it: made there on first use, closed there after
    the read in flight (a consumer must not be closed under a read)."""

    def __init__(self, factory: Callable[[], Any]):
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kaireon-audit")
        self._factory = factory
        self._reader: Any = None

    def reader(self) -> Any:  # in the lane's thread
        if self._reader is None:
            self._reader = self._factory()
        return self._reader

    def _close_reader(self) -> None:  # in the lane's thread
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        self.thread.submit(self._close_reader)
        self.thread.shutdown(wait=False)


def _record_reader(settings: Settings) -> Any:
    from kaireon_pub.audit.broker import RecordReader

    # librdkafka's default fetch.wait.max.ms (500) made every read_at take 0.5 s (measured against
    # the tests' Kafka: 507 ms median); 10 ms: 13 ms. The reader holds no assignment between reads,
    # so it never polls an idle partition at that pace.
    return RecordReader({**settings.producer_config, "fetch.wait.max.ms": "10"}, client_id="kaireon-pub-audit")


def start(tasks: Any, settings: Settings, pool: psycopg_pool.AsyncConnectionPool,
          owned: Callable[[], Collection[int]], stopping: Callable[[], bool]) -> Auditor | None:
    """Start the auditor as a task of `tasks` when OUTBOX_AUDIT_SAMPLE_PER_MINUTE > 0 (restarted if it dies)."""
    if settings.audit_sample_per_minute <= 0:
        return None
    auditor = Auditor(settings, pool, owned)
    tasks.start("auditor", lambda: auditor.run(stopping))
    return auditor
