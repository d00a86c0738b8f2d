"""The drain with DELETE-based retention against partition-dropped retention, while old published
rows are purged.

`python -m bench.retention [--old 1000000] [--backlog 100000] [--database-url URL]`: for each mode a
fresh database (plain: `migrate`; partitioned: `migrate` with OUTBOX_PARTITIONING=hourly) holding
`--old` published rows from four past hours (in four past partitions when partitioned) whose
retention has passed, VACUUMed, then `--backlog` pending rows committed and the real tier started
(2 workers, OUTBOX_RETENTION_SECONDS=60, OUTBOX_PURGE_INTERVAL_SECONDS=1). Measured from the
tier's start: the drain (the last backlog row published), the retention (no old row left), and
the dead tuples left on outbox_events afterwards. The row purge pauses while a backlog drains (the
claim has the database), so the DELETE mode purges after the drain; partition drops do not pause.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg

from bench.backlog import KEYS
from kaireon_pub.db import partitions as parts
from kaireon_pub.db.migrate import migrate

_OLD = """
INSERT INTO outbox_events (topic, partition_key, payload_bytes, status, created_at, published_at, updated_at)
SELECT 'retention-old', 'agg-' || (g %% %(keys)s), convert_to(repeat(md5(g::text), 8), 'UTF8'), 'published',
       %(at)s::timestamptz + (g %% 3000) * interval '1 s', %(at)s::timestamptz + interval '1 h',
       %(at)s::timestamptz + interval '1 h'
FROM generate_series(1, %(n)s::bigint) g
"""
_NEW = """
INSERT INTO outbox_events (topic, partition_key, payload_bytes)
SELECT %(topic)s, 'agg-' || (g %% %(keys)s), convert_to(repeat(md5(g::text), 8), 'UTF8')
FROM generate_series(1, %(n)s::bigint) g
"""


def prepare(url: str, mode: str, old: int, backlog: int, topic: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, partitioning="hourly" if mode == "partitions" else "none")
        floor = parts.floor(conn.execute("SELECT clock_timestamp()").fetchone()[0], "hourly")
        for h in range(4):  # four past hours, each its own partition when partitioned
            lower = floor - timedelta(hours=30 - h)
            if mode == "partitions":
                name = parts.partition_name(lower, "hourly")
                conn.execute(parts._q(parts.P.create_partition, partition=name))
                conn.execute(parts._q(parts.P.attach_partition, partition=name, lower=lower,
                                      upper=lower + timedelta(hours=1)))
            conn.execute(_OLD, {"keys": KEYS, "n": old // 4, "at": lower})
        conn.execute("VACUUM ANALYZE outbox_events")
        conn.execute(_NEW, {"topic": topic, "keys": KEYS, "n": backlog})
        conn.execute("ANALYZE outbox_events")


def run_mode(services, mode: str, old: int, backlog: int, run_dir: Path) -> dict[str, float]:
    from bench.tier import Tier

    name = f"bench_ret_{uuid.uuid4().hex[:8]}"
    url = services.pg.create_database(name)
    topic = services.fresh_topic("retention")
    services.settle()
    prepare(url, mode, old, backlog, topic)
    tier = Tier(url, services.bootstrap, run_dir / mode, OUTBOX_RETENTION_SECONDS="60",
                OUTBOX_PURGE_INTERVAL_SECONDS="1")
    started = time.monotonic()
    drained = retained = None
    deadline = started + max(300.0, (old + backlog) / 2000)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            while time.monotonic() < deadline and (drained is None or retained is None):
                time.sleep(0.1)
                if drained is None and not conn.execute(
                        "SELECT EXISTS (SELECT 1 FROM outbox_events WHERE status IN ('pending', 'processing'))"
                ).fetchone()[0]:
                    drained = time.monotonic() - started
                if retained is None and not conn.execute(
                        "SELECT EXISTS (SELECT 1 FROM outbox_events WHERE topic = 'retention-old')").fetchone()[0]:
                    retained = time.monotonic() - started
            dead = conn.execute("SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables "
                                "WHERE relname LIKE 'outbox_events%%'").fetchone()[0]
    finally:
        tier.stop()
        services.pg.drop_database(name)
        services.drop_topic(topic)
    return {"drain_s": drained, "retention_s": retained, "dead_tuples": dead}


def main() -> None:
    from bench.env import Services

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=int, default=1_000_000)
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--bootstrap", default=None)
    args = ap.parse_args()
    services = Services(args.database_url, args.bootstrap)
    run_dir = Path(tempfile.mkdtemp(prefix="kaireon-bench-retention-"))
    try:
        results = {}
        for mode in ("delete", "partitions"):
            results[mode] = run_mode(services, mode, args.old, args.backlog, run_dir)
            print(f"retention {mode:<10} {results[mode]}", flush=True)
        d, p = results["delete"], results["partitions"]
        if d["drain_s"] and p["drain_s"]:
            print(f"retention drain partitions/delete time ratio {p['drain_s'] / d['drain_s']:.2f}; "
                  f"old rows gone after {d['retention_s']} s (DELETE) vs {p['retention_s']} s (drop)")
    finally:
        services.close()


if __name__ == "__main__":
    main()
