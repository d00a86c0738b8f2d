"""The `retention` scenario: the drain with DELETE-based retention against partition-dropped
retention, while old published rows are purged.

`python -m bench retention [--retention-old 1000000] [--backlog 100000]`, also part of `all`
(`--quick`: 6,000 old rows, a backlog of 3,000); `python -m bench.retention [--old N] [--backlog N]`
runs it alone (`__main__.py`: the scenario never imports the bench's command line, which imports
it). For each mode a fresh database (plain: `migrate`; partitioned: `migrate` with
OUTBOX_PARTITIONING=hourly) holding the old published rows, from four past hours (in four past
partitions when partitioned) whose retention has passed, VACUUMed, then the backlog of pending
rows committed and the real tier started (2 workers, OUTBOX_RETENTION_SECONDS=60,
OUTBOX_PURGE_INTERVAL_SECONDS=1). Measured from the tier's start: the drain (the last backlog row
published), the retention (no old row left), and the dead tuples left on outbox_events afterwards.
The row purge pauses while a backlog drains (the claim has the database), so the DELETE mode
purges after the drain; partition drops do not pause.
"""

from __future__ import annotations

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


def run_mode(services, mode: str, old: int, backlog: int, run_dir: Path,
             env: dict[str, str] | None = None) -> dict[str, float | None]:
    """One mode on a fresh database: seconds from the tier's start to the drain's end
    (`drain_s`) and to the last old row gone (`retention_s`), None when not within the time allowed
    (`timeout_s`), and the dead tuples left."""
    from bench.tier import Tier

    name = f"bench_ret_{uuid.uuid4().hex[:8]}"
    url = services.pg.create_database(name)
    topic = services.fresh_topic("retention")
    timeout = max(60.0, (old + backlog) / 1000)
    tier = None
    drained = retained = None
    try:
        services.settle()
        prepare(url, mode, old, backlog, topic)
        tier = Tier(url, services.bootstrap, run_dir / mode,
                    **{**(env or {}), "OUTBOX_RETENTION_SECONDS": "60", "OUTBOX_PURGE_INTERVAL_SECONDS": "1"})
        started = time.monotonic()
        deadline = started + timeout
        with psycopg.connect(url, autocommit=True) as conn:
            while time.monotonic() < deadline and (drained is None or retained is None):
                for sup in tier.sups:
                    if sup.proc.poll() is not None:
                        raise RuntimeError(f"the tier exited with {sup.proc.returncode}; see {sup.log_path}")
                time.sleep(0.1)
                if drained is None and not conn.execute(
                        "SELECT EXISTS (SELECT 1 FROM outbox_events WHERE status IN ('pending', 'processing'))"
                ).fetchone()[0]:
                    drained = time.monotonic() - started
                if retained is None and not conn.execute(
                        "SELECT EXISTS (SELECT 1 FROM outbox_events WHERE topic = 'retention-old')").fetchone()[0]:
                    retained = time.monotonic() - started
            dead = conn.execute("SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables "
                                "WHERE relname LIKE 'outbox_events%'").fetchone()[0]
    finally:
        if tier is not None:
            tier.stop()
        services.pg.drop_database(name)
        services.drop_topic(topic)
    return {"drain_s": drained, "retention_s": retained, "dead_tuples": dead, "timeout_s": timeout}


def run(bench) -> None:
    """The scenario in a bench run (bench.cli): both modes, their figures in the report."""
    r, old, n = bench.r, bench.plan.retention_old, bench.plan.backlog
    r.say(f"\n== retention: {old:,} published rows past their retention (four past hours) and {n:,} pending,"
          " then the tier (2 workers, OUTBOX_RETENTION_SECONDS=60, purge every 1 s); times from its start:"
          " DELETE purge (plain table) vs partition drops (OUTBOX_PARTITIONING=hourly)")
    results = {}
    for mode, label in (("delete", "DELETE purge"), ("partitions", "partition drops")):
        res = results[mode] = run_mode(bench.s, mode, old, n, bench.run_dir / f"retention-{mode}",
                                       bench.plan.tier_env)
        late = f"not within {res['timeout_s']:.0f} s"
        r.add(f"ret_{mode}_drain", f"{label}: drain of {n:,}", res["drain_s"], "s",
              late if res["drain_s"] is None else f"{n / res['drain_s']:,.0f} ev/s from the tier's start")
        r.add(f"ret_{mode}_gone", f"{label}: {old:,} old rows gone", res["retention_s"], "s",
              late if res["retention_s"] is None else f"{res['dead_tuples']:,} dead tuples left on outbox_events")
    d, p = results["delete"], results["partitions"]
    r.add("ret_drain_ratio", "  drain time, drops / DELETE", _ratio(p["drain_s"], d["drain_s"]), "x",
          "the purge pauses while a backlog drains: its cost lands after the drain")
    r.add("ret_ratio", "  old rows gone, drops / DELETE", _ratio(p["retention_s"], d["retention_s"]), "x",
          "time from the tier's start; lower is better")
    missing = [f"{mode} {what}" for mode, res in results.items()
               for what in ("drain_s", "retention_s") if res[what] is None]
    if missing:
        raise RuntimeError("retention: not measured within the time allowed: " + ", ".join(missing))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
