"""The `drain` scenario: the warm 1 supervisor × 2 workers tier draining `--backlog` events
committed at once (the median of `--repeat`), against the status + broker ceiling, with its CPU,
row writes and RSS per event; then the big backlog, once on a fresh table and again over the dead
tuples of the first (autovacuum off). The status drain is the baseline other scenarios compare with
(`status_drain_rate`, measured there if this scenario did not run)."""

from __future__ import annotations

import psycopg

from bench import backlog
from bench.tier import drain

MB = 1024 * 1024


def spread(d) -> str:
    return f"; {d.spread}" if d.spread else ""


def run(bench) -> None:
    r, p = bench.r, bench.plan
    r.say(f"\n== drain: a warm 1 supervisor × 2 workers tier, {p.backlog:,} events committed at once")
    report(bench, bench.drain_median("drain"))
    big(bench)


def status_drain_rate(bench) -> float:
    """The 1 × 2 status-mode drain of this run, measured now if no scenario did yet."""
    if bench.r.value("drain") is None:
        d = bench.drain_median("drain")
        report(bench, d)
    return bench.r.value("drain")


def report(bench, d) -> None:
    r = bench.r
    ceiling = r.combined("sql_status_2p")
    r.add("drain", f"drain {bench.plan.backlog:,} (status, 1×2)", d.rate, "ev/s",
          r.against(d.rate, ceiling, "status+broker") + "; "
          + r.against(d.rate, r.ceilings.get("sql_status_2p"), "status SQL-only") + spread(d))
    r.add("drain_ratio", "  drain / status+broker ceiling", d.rate / ceiling if ceiling else None, "x",
          "target ≥ 0.80")
    cpu_ceiling = r.ceilings.get("cpu_per_1k")
    r.add("drain_cpu", "  tier CPU per 1,000 events", d.cpu_per_1k, "s/1k",
          (f"{d.cpu_per_1k / cpu_ceiling:.2f} × the bare loops' client CPU ({cpu_ceiling:.3f})"
           if cpu_ceiling else "(no ceiling CPU measured)")
          + (f"; PostgreSQL backends {d.db_cpu_per_1k:.3f}" if d.db_cpu_per_1k is not None else "")
          + (f"; {d.writes_per_event:.2f} row writes/event" if d.writes_per_event is not None else ""))
    r.add("drain_rss", "  peak worker RSS", d.peak_rss / MB, "MB",
          f"{d.peak_rss / MB / 150:.2f} × the 150 MB target")
    bench._peak_rss(d.peak_rss)
    if ceiling:
        r.target("drain ≥ 0.8 × status ceiling", d.rate >= 0.8 * ceiling,
                 f"{d.rate:,.0f}/s = {d.rate / ceiling:.2f} × {ceiling:,.0f}/s (status SQL 2 proc "
                 f"{r.ceilings['sql_status_2p']:,.0f}/s with broker {r.ceilings['produce']:,.0f}/s)")


def big(bench) -> None:
    r, p = bench.r, bench.plan
    n = p.big_backlog
    r.say(f"\n== drain at {n:,}: once on a fresh table, then again over the dead tuples of the first"
          " (autovacuum off on the table, no VACUUM)")
    url, topic = bench.s.fresh_database("big"), bench.s.fresh_topic("big")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE outbox_events SET (autovacuum_enabled = false)")
        tier = bench.tier(url)
        try:
            first = drain(tier, lambda: backlog.load(url, topic, n), n)
            r.add("big_clean", f"drain {n:,}, fresh table", first.rate, "ev/s",
                  r.against(first.rate, r.combined("sql_status_2p"), "status+broker"))
            with psycopg.connect(url, autocommit=True) as conn:
                dead = conn.execute("SELECT n_dead_tup FROM pg_stat_user_tables"
                                    " WHERE relname = 'outbox_events'").fetchone()[0]
            second = drain(tier, lambda: backlog.load(url, topic, n, start=n + 1), n)
        finally:
            tier.stop()
    finally:
        bench.s.drop_topic(topic)
        bench.s.drop_database(url)
    r.add("big", f"drain {n:,}, over {n:,} drained rows (~{dead:,} dead tuples)", second.rate, "ev/s",
          r.against(second.rate, r.combined("sql_status_2p"), "status+broker"))
    bench._peak_rss(max(first.peak_rss, second.peak_rss))
    base = status_drain_rate(bench)
    ratio = second.rate / base if base else None
    r.add("big_ratio", f"  drain({n:,}, dead tuples) / drain({p.backlog:,})", ratio, "x", "target ≥ 0.90")
    r.target("drain(1M) ≥ 0.9 × drain(100k)", ratio >= 0.9 if ratio else None,
             f"{second.rate:,.0f} / {base:,.0f} = {ratio:.2f} (fresh-table 1M: {first.rate:,.0f}/s)")
