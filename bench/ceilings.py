"""The same-run ceilings: what PostgreSQL alone and the broker alone can do on this machine.

- status: the tier's own claim (Q.claim_batch, strict ordering, per-shard cursors, the xid
  horizon, FOR UPDATE SKIP LOCKED) then Q.mark_published, from 1 or 2 processes, each holding a
  synthetic lease on its half of the 256 shards (Q.register_worker + Q.acquire_leases);
- lock: one transaction per batch, the row locks are the claim (SELECT … FOR UPDATE SKIP LOCKED
  from the same per-shard cursors, then UPDATE … published, or DELETE), one write per row;
- produce: a bare confluent-kafka loop with the tier's producer settings and message shape.
Each loop runs until the backlog is empty; the rate is rows / (last finish − first start).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from dataclasses import dataclass

import psycopg

from kaireon_pub.db.queries import Q, int_array
from kaireon_pub.settings import PRODUCER_DEFAULTS

SHARDS = 256
ZERO = (0, 0)

# The lock-mode claim: the tier's candidate scan (same index, cursors and horizon), no status write.
LOCK_CLAIM = """
WITH horizon AS MATERIALIZED (  -- the tier's horizon (see claim_locked_batch), at the same cost
    SELECT coalesce(
               (SELECT min(x) FROM pg_snapshot_xip(s.snap) AS x
                WHERE x::xid NOT IN (SELECT a.backend_xid FROM pg_stat_activity a
                                     WHERE a.backend_xid IS NOT NULL
                                       AND a.application_name LIKE 'kaireon-pub:worker-%%')),
               pg_snapshot_xmax(s.snap)) AS xmin
    FROM (SELECT pg_current_snapshot() AS snap) s
), cursors AS MATERIALIZED (
    SELECT c.shard, c.cxid, c.cid, c.n
    FROM unnest(%(shards)s::smallint[], %(cursor_xids)s::text[]::xid8[], %(cursor_ids)s::bigint[])
         WITH ORDINALITY AS c(shard, cxid, cid, n)
    ORDER BY c.n
)
SELECT e.id, e.topic, e.partition_key, coalesce(e.payload_bytes, convert_to(e.payload::text, 'UTF8')),
       e.headers::text, e.event_type, e.attempts, e.shard, e.xid::text::bigint,
       extract(epoch FROM e.created_at)::float8, e.binary_headers::text, e.partition_key_bytes
FROM cursors c
CROSS JOIN LATERAL (
    SELECT * FROM outbox_events e
    WHERE e.status = 'pending' AND e.shard = c.shard
      AND (e.xid, e.id) > (c.cxid, c.cid)
      AND e.xid < (SELECT xmin FROM horizon)
      AND e.next_attempt_at <= clock_timestamp()
    ORDER BY e.xid, e.id
    LIMIT %(batch)s
    FOR UPDATE OF e SKIP LOCKED
) e
LIMIT %(batch)s
"""
LOCK_MARK = """
UPDATE outbox_events SET status = 'published', published_at = clock_timestamp(),
       updated_at = clock_timestamp()
WHERE id = ANY(%(ids)s::bigint[])
"""
LOCK_DELETE = "DELETE FROM outbox_events WHERE id = ANY(%(ids)s::bigint[])"


@dataclass
class LoopResult:
    rows: int
    seconds: float
    cpu_seconds: float  # the client process's own CPU (the database's is not in it)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_seconds / self.rows * 1000 if self.rows else 0.0


def synthetic_leases(url: str, processes: int) -> list[tuple[uuid.UUID, dict[int, int]]]:
    """One registered worker per process, each leasing an equal share of the shards for 10 min."""
    out = []
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(processes):
            worker_id = uuid.uuid4()
            conn.execute(Q.register_worker, {"worker_id": worker_id, "hostname": "bench", "pid": os.getpid(),
                                             "slot": i, "ttl": 600})
            rows = conn.execute(Q.acquire_leases, {"worker_id": worker_id, "n": SHARDS // processes,
                                                   "ttl": 600}).fetchall()
            out.append((worker_id, {int(s): int(e) for s, e in rows}))
    return out


class Cursors:
    """The worker's per-shard cursors and shard rotation, as in kaireon_pub.worker.loop."""

    def __init__(self, shards: list[int]):
        self.shards = sorted(shards)
        self.pos: dict[int, tuple[int, int]] = {}
        self.rotation = 0

    def rotated(self) -> list[int]:
        self.rotation = (self.rotation + 1) % len(self.shards)
        return self.shards[self.rotation:] + self.shards[:self.rotation]

    def params(self, shards: list[int]) -> dict[str, list]:
        return {"cursor_xids": [str(self.pos.get(s, ZERO)[0]) for s in shards],
                "cursor_ids": [self.pos.get(s, ZERO)[1] for s in shards]}

    def advance(self, rows: list[tuple]) -> None:
        for row in rows:
            shard, position = row[7], (row[8], row[0])
            if position > self.pos.get(shard, ZERO):
                self.pos[shard] = position


def _status_loop(url: str, worker_id: uuid.UUID, leases: dict[int, int], batch: int, options: str) -> int:
    cursors = Cursors(list(leases))
    total = 0
    with psycopg.connect(url, autocommit=True, options=options) as conn:
        while True:
            shards = cursors.rotated()
            token = uuid.uuid4()
            # The tier's two statements per claim: the horizon, then the claim below it.
            horizon = conn.execute(Q.claim_horizon,
                                   {"max_wait_ms": 5000, "remembered": [], "pass_over": []}).fetchone()[0]
            rows = conn.execute(Q.claim_batch, {
                "shards": shards, "epochs": [leases[s] for s in shards], **cursors.params(shards),
                "worker_id": worker_id, "relaxed": False, "batch": batch, "token": token,
                "staleness": 600, "horizon": str(horizon),
            }).fetchall()
            if not rows:
                return total
            cursors.advance(rows)
            ids = sorted(r[0] for r in rows)  # the tier marks each id with a partition and offset, ids sorted
            # As the tier sends them (settle.py): array literals. Python lists made the mark's generic plan
            # (from its 11th execution) cost 41-46 ms of server CPU per 1,000 rows, 10-15 ms as text.
            cur = conn.execute(Q.mark_published, {"ids": int_array(ids), "partitions": int_array([0] * len(ids)),
                                                  "offsets": int_array(ids), "token": token})
            total += cur.rowcount


def _lock_loop(url: str, shards: list[int], batch: int, delete: bool, options: str) -> int:
    cursors = Cursors(shards)
    total = 0
    with psycopg.connect(url, options=options) as conn:
        while True:
            rotated = cursors.rotated()
            rows = conn.execute(LOCK_CLAIM, {"shards": rotated, "batch": batch,
                                             **cursors.params(rotated)}).fetchall()
            if not rows:
                conn.rollback()
                return total
            cursors.advance(rows)
            cur = conn.execute(LOCK_DELETE if delete else LOCK_MARK, {"ids": [r[0] for r in rows]})
            conn.commit()
            total += cur.rowcount


def _child(kind: str, url: str, worker_id: uuid.UUID, leases: dict[int, int], batch: int, options: str,
           barrier, results) -> None:
    # The parent handles Ctrl-C and terminates its children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    barrier.wait(60)
    started, cpu0 = time.monotonic(), time.process_time()
    if kind == "status":
        rows = _status_loop(url, worker_id, leases, batch, options)
    else:
        rows = _lock_loop(url, list(leases), batch, kind == "lock-delete", options)
    results.put((rows, started, time.monotonic(), time.process_time() - cpu0))


def sql_ceiling(url: str, kind: str, processes: int, batch: int, synchronous_commit: str) -> LoopResult:
    """kind: status | lock | lock-delete; the backlog must already be loaded in `url`.
    `synchronous_commit` is the tier's (OUTBOX_SYNCHRONOUS_COMMIT): the same commit cost per batch."""
    options = f"-c synchronous_commit={synchronous_commit}"
    ctx = multiprocessing.get_context("spawn")
    leases = synthetic_leases(url, processes)
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(kind, url, wid, owned, batch, options, barrier, results), daemon=True)
             for wid, owned in leases]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=900) for _ in procs]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
    rows = sum(g[0] for g in got)
    seconds = max(g[2] for g in got) - min(g[1] for g in got)
    return LoopResult(rows, seconds, sum(g[3] for g in got))


def produce_ceiling(bootstrap: str, topic: str, n: int) -> LoopResult:
    """A bare produce loop: the tier's producer settings, ~300 B values, the tier's headers."""
    from confluent_kafka import Producer

    config = {k: v for k, v in PRODUCER_DEFAULTS.items()}
    config.update({"bootstrap.servers": bootstrap, "client.id": "bench-produce-ceiling"})
    producer = Producer(config)
    failed = []

    def on_delivery(err, _msg) -> None:
        if err is not None:
            failed.append(err)

    noise = [os.urandom(128).hex().encode() for _ in range(64)]
    from bench.backlog import payload

    # Warm up: metadata and the idempotent producer id, outside the timed loop.
    producer.produce(topic, value=b"{}", key=b"warm-up", on_delivery=on_delivery)
    producer.flush(15)
    started, cpu0 = time.monotonic(), time.process_time()
    created = b"2026-01-01T00:00:00.000000+00:00"
    for i in range(n):
        value = payload(i, noise[i % 64])
        headers = [("event-id", str(i).encode()), ("event-type", b"bench.event"), ("created-at", created)]
        while True:
            try:
                producer.produce(topic, value=value, key=b"agg-%d" % (i % 1000), headers=headers,
                                 on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    left = producer.flush(60)
    seconds = time.monotonic() - started
    cpu = time.process_time() - cpu0
    if left or failed:
        raise RuntimeError(f"produce ceiling: {left} undelivered, {len(failed)} failed "
                           f"({failed[0] if failed else ''})")
    return LoopResult(n, seconds, cpu)
