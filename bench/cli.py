"""`python -m bench [drain|cold|latency|ceilings|scale|purge|lock|retention|debezium-write|all ...] [options]`: runs the
scenarios in order against one PostgreSQL and one broker, prints every figure as it is measured,
the targets of issues 5 and 6, and one SUMMARY line, also when interrupted with Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg

from bench import backlog
from bench.ceilings import produce_ceiling, sql_ceiling
from bench.cold import DistinctReader, Run, boot_steps, recount
from bench.env import BROKERS, PARTITIONS, Services
from bench.latency import TopicLatency, histogram_percentiles
from bench.report import Figure, Report
from bench.tier import Tier, drain, row_writes
from kaireon_pub.settings import DEFAULTS, SYNCHRONOUS_COMMIT_LEVELS

SCENARIOS = ("ceilings", "drain", "cold", "lock", "scale", "purge", "retention", "latency", "pgbouncer",
             "debezium-write")
MB = 1024 * 1024


@dataclass
class Plan:
    backlog: int
    big_backlog: int
    ceiling_rows: int
    produce_messages: int
    batch: int
    rate: float
    latency_seconds: float
    warmup_seconds: float
    tier_env: dict[str, str]
    repeat: int  # runs per backlog drain figure (the median is reported)
    balanced: bool  # wait for the fair share before timing (the smoke run only waits for ownership)
    cold_big: bool  # the cold start also at the big backlog (not in --quick)
    retention_old: int  # published rows past their retention in the retention scenario
    write_transactions: int  # one-event transactions per form in debezium-write (ten-event: half as many)


def plan_from(args: argparse.Namespace) -> Plan:
    quick = args.quick
    env = {"OUTBOX_BATCH_SIZE": str(args.batch), "OUTBOX_SYNCHRONOUS_COMMIT": args.synchronous_commit,
           **dict(kv.split("=", 1) for kv in args.tier_env)}
    return Plan(
        backlog=args.backlog or (3_000 if quick else 100_000),
        big_backlog=args.big_backlog or (6_000 if quick else 1_000_000),
        ceiling_rows=args.ceiling_rows or (5_000 if quick else 300_000),
        produce_messages=args.produce_messages or (5_000 if quick else 500_000),
        batch=args.batch,
        rate=args.rate or (200.0 if quick else 2000.0),
        latency_seconds=args.latency_seconds or (3.0 if quick else 30.0),
        warmup_seconds=1.0 if quick else 3.0,
        tier_env=env,
        repeat=args.repeat or (1 if quick else 3),
        balanced=not quick,
        cold_big=not quick,
        retention_old=args.retention_old or (6_000 if quick else 1_000_000),
        write_transactions=args.write_transactions or (100 if quick else 5_000),
    )


def spread(d) -> str:
    return f"; {d.spread}" if d.spread else ""


class Bench:
    def __init__(self, services: Services, plan: Plan, report: Report, run_dir: Path):
        self.s, self.plan, self.r, self.run_dir = services, plan, report, run_dir
        self.n_tiers = 0

    # ---- helpers -----------------------------------------------------------------------------

    def tier(self, url: str, *, supervisors: int = 1, workers: int = 2, ready: bool = True, **env: str) -> Tier:
        self.n_tiers += 1
        tier = Tier(url, self.s.bootstrap, self.run_dir / f"tier{self.n_tiers}", supervisors=supervisors,
                    workers=workers, **{**self.plan.tier_env, **env})
        if not ready:
            return tier
        try:
            tier.wait_ready(balanced=self.plan.balanced)
        except BaseException:
            tier.stop()
            raise
        return tier

    def drain_median(self, name: str, **kwargs):
        """drain_once `--repeat` times; the run of median rate, with every rate kept. A 100,000-event
        drain lasts a few seconds, and on these shared cores one run can be 10–20 % off."""
        runs = sorted((self.drain_once(name, **kwargs) for _ in range(self.plan.repeat)), key=lambda d: d.rate)
        median = runs[len(runs) // 2]
        median.rates = tuple(d.rate for d in runs)
        median.peak_rss = max(d.peak_rss for d in runs)
        return median

    def drain_once(self, name: str, *, supervisors: int = 1, workers: int = 2, published: int = 0,
                   watch_processing: bool = False, **env: str):
        """A fresh database and topic, a warm tier, one backlog committed at once, drained."""
        url, topic = self.s.fresh_database(name), self.s.fresh_topic(name)
        try:
            if published:
                backlog.load_published(url, topic, published, start=10_000_000)
            tier = self.tier(url, supervisors=supervisors, workers=workers, **env)
            n = self.plan.backlog
            try:
                result = drain(tier, lambda: backlog.load(url, topic, n), n, watch_processing=watch_processing)
            finally:
                tier.stop()
            result.writes_per_event = row_writes(url) / n
            return result
        finally:
            self.s.drop_topic(topic)
            self.s.drop_database(url)

    def status_drain_rate(self) -> float:
        """The 1 × 2 status-mode drain of this run, measured now if no scenario did yet."""
        if self.r.value("drain") is None:
            d = self.drain_median("drain")
            self.report_drain(d)
        return self.r.value("drain")

    def report_drain(self, d) -> None:
        r = self.r
        ceiling = r.combined("sql_status_2p")
        r.add("drain", f"drain {self.plan.backlog:,} (status, 1×2)", d.rate, "ev/s",
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
        self._peak_rss(d.peak_rss)
        if ceiling:
            r.target("drain ≥ 0.8 × status ceiling", d.rate >= 0.8 * ceiling,
                     f"{d.rate:,.0f}/s = {d.rate / ceiling:.2f} × {ceiling:,.0f}/s (status SQL 2 proc "
                     f"{r.ceilings['sql_status_2p']:,.0f}/s with broker {r.ceilings['produce']:,.0f}/s)")

    def _peak_rss(self, rss: int) -> None:
        # Kept quietly and printed once in the summary: the max over every scenario's workers.
        peak = max(rss / MB, self.r.value("peak_rss") or 0.0)
        self.r.figures["peak_rss"] = Figure("peak_rss", "peak worker RSS (all scenarios)", peak, "MB")

    # ---- scenarios -----------------------------------------------------------------------------

    def ceilings(self) -> None:
        r, p = self.r, self.plan
        r.say(f"\n== ceilings: bare loops, batch {p.batch}, {p.ceiling_rows:,} rows each, no broker in the SQL ones,"
              f" synchronous_commit={p.tier_env['OUTBOX_SYNCHRONOUS_COMMIT']} as the tier's sessions")
        cpu_sql = None
        for kind, procs, key in (("status", 1, "sql_status_1p"), ("status", 2, "sql_status_2p"),
                                 ("lock", 2, "sql_lock_2p"), ("lock-delete", 2, "sql_lock_delete_2p")):
            url = self.s.fresh_database(f"ceil-{kind}")
            try:
                backlog.load(url, "bench-ceiling", p.ceiling_rows, notify=False)
                res = sql_ceiling(url, kind, procs, p.batch, p.tier_env["OUTBOX_SYNCHRONOUS_COMMIT"])
            finally:
                self.s.drop_database(url)
            if res.rows != p.ceiling_rows:
                raise RuntimeError(f"{kind} ceiling loop moved {res.rows} of {p.ceiling_rows} rows")
            r.ceilings[key] = res.rate
            if key == "sql_status_2p":
                cpu_sql = res.cpu_per_1k
            r.add(key, f"SQL {kind} claim+mark, {procs} process{'es' if procs > 1 else ''}", res.rate, "ev/s",
                  f"client CPU {res.cpu_per_1k:.3f} s/1k")
        topic = self.s.fresh_topic("ceil-produce")
        try:
            res = produce_ceiling(self.s.bootstrap, topic, p.produce_messages)
        finally:
            self.s.drop_topic(topic)
        r.ceilings["produce"] = res.rate
        r.add("produce", f"produce loop, 1 process, {PARTITIONS} partitions, {self.s.broker_name}", res.rate, "ev/s",
              f"client CPU {res.cpu_per_1k:.3f} s/1k")
        r.ceilings["cpu_per_1k"] = (cpu_sql or 0.0) + res.cpu_per_1k
        for name, key in (("status", "sql_status_2p"), ("lock", "sql_lock_2p"), ("lock+delete", "sql_lock_delete_2p")):
            r.add(f"ceil_{name}", f"combined {name} + broker ceiling (1/(1/sql+1/broker))",
                  r.combined(key), "ev/s", "what a tier of 2 workers could reach on these cores")

    def drain(self) -> None:
        r, p = self.r, self.plan
        r.say(f"\n== drain: a warm 1 supervisor × 2 workers tier, {p.backlog:,} events committed at once")
        self.report_drain(self.drain_median("drain"))
        self.big()

    def big(self) -> None:
        r, p = self.r, self.plan
        n = p.big_backlog
        r.say(f"\n== drain at {n:,}: once on a fresh table, then again over the dead tuples of the first"
              " (autovacuum off on the table, no VACUUM)")
        url, topic = self.s.fresh_database("big"), self.s.fresh_topic("big")
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ALTER TABLE outbox_events SET (autovacuum_enabled = false)")
            tier = self.tier(url)
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
            self.s.drop_topic(topic)
            self.s.drop_database(url)
        r.add("big", f"drain {n:,}, over {n:,} drained rows (~{dead:,} dead tuples)", second.rate, "ev/s",
              r.against(second.rate, r.combined("sql_status_2p"), "status+broker"))
        self._peak_rss(max(first.peak_rss, second.peak_rss))
        base = self.status_drain_rate()
        ratio = second.rate / base if base else None
        r.add("big_ratio", f"  drain({n:,}, dead tuples) / drain({p.backlog:,})", ratio, "x", "target ≥ 0.90")
        r.target("drain(1M) ≥ 0.9 × drain(100k)", ratio >= 0.9 if ratio else None,
                 f"{second.rate:,.0f} / {base:,.0f} = {ratio:.2f} (fresh-table 1M: {first.rate:,.0f}/s)")

    def cold(self) -> None:
        r, p = self.r, self.plan
        sizes = [p.backlog, *([p.big_backlog] if p.cold_big else [])]
        for n in sizes:
            small = n == p.backlog
            repeat = p.repeat if small else 1
            r.say(f"\n== cold start: 1 supervisor × 2 workers spawned against {n:,} events already committed,"
                  f" beside a warm drain of the same backlog; both timed to the last distinct event id on the topic"
                  f" (a reader counting them){f', {repeat} of each, alternating' if repeat > 1 else ''}")
            warm_runs, cold_runs = [], []
            for _ in range(repeat):
                warm_runs.append(self.cold_once(n, cold=False))
                cold_runs.append(self.cold_once(n, cold=True))
            by_reader = all(x.seconds for x in warm_runs + cold_runs)
            rate = (lambda x: x.rate) if by_reader else (lambda x: x.counter_rate)  # noqa: E731
            basis = "the topic reader" if by_reader else "the tier's counter (the reader fell short, above)"
            warm = sorted(warm_runs, key=rate)[len(warm_runs) // 2]
            cold = sorted(cold_runs, key=rate)[len(cold_runs) // 2]
            sfx = "" if small else "_big"
            first_ms = "n/a" if cold.first_event is None else f"{cold.first_event * 1000:.0f} ms"
            r.add(f"cold{sfx}", f"cold start {n:,}: spawn → last event", rate(cold), "ev/s",
                  f"{n / rate(cold):.2f} s by {basis}; first event {first_ms} after the spawn"
                  + _spread(cold_runs, rate))
            r.add(f"warm{sfx}", f"warm drain {n:,}: commit → last event", rate(warm), "ev/s",
                  f"{n / rate(warm):.2f} s" + _spread(warm_runs, rate))
            ratio = rate(cold) / rate(warm) if rate(warm) else None
            counter_ratio = (_median_of([x.counter_rate for x in cold_runs])
                             / (_median_of([x.counter_rate for x in warm_runs]) or float("nan")))
            r.add(f"cold_ratio{sfx}", "  cold / warm", ratio, "x",
                  ("target ≥ 0.90; " if small else "") + f"by the tier's counter: {counter_ratio:.2f}")
            if not small:
                continue
            r.target(f"cold start ≥ 0.9 × warm drain at {n:,}", ratio >= 0.9 if ratio else None,
                     f"{rate(cold):,.0f} / {rate(warm):,.0f} = {ratio:.2f} (medians of {repeat}, by {basis})")
            firsts = sorted(x.first_event for x in cold_runs if x.first_event is not None)
            first = firsts[len(firsts) // 2] if firsts else None
            r.add("first_publish", "  spawn → first event on the topic", None if first is None else first * 1000, "ms",
                  "target ≤ 400 ms; an upper bound: it includes the broker's fetch path; "
                  + ", ".join(f"{x * 1000:.0f}" for x in firsts) + " ms")
            for label in cold.boot:
                steps = sorted(x.boot[label] for x in cold_runs if label in x.boot)
                r.say(f"    boot: {label:<72} {steps[len(steps) // 2] * 1000:6.0f} ms after the spawn (median)")
            if first is not None:
                r.target("first publish ≤ 0.4 s after `kaireon-pub run`", first <= 0.4,
                         f"{first * 1000:.0f} ms to the first event on the topic (median of {len(firsts)})")

    def cold_once(self, n: int, *, cold: bool) -> Run:
        """A fresh database and topic; cold: the backlog committed, then the tier spawned; warm:
        the tier started and balanced, then the backlog committed. Timed by a reader of the topic."""
        name = "cold" if cold else "warm"
        url, topic = self.s.fresh_database(name), self.s.fresh_topic(name)
        try:
            if cold:
                backlog.load(url, topic, n, notify=False)
            reader = DistinctReader(self.s.bootstrap, topic, PARTITIONS, n)
            reader.start()
            try:
                reader.wait_ready()
                spawn_wall = time.time()
                started = time.monotonic()
                tier = self.tier(url, ready=not cold)
                try:
                    if not cold:
                        started = backlog.load(url, topic, n)
                    counter_end = _watch(tier, reader, n, started, max(120.0, n / 1000))
                    boot = boot_steps([sup.log_path for sup in tier.sups], spawn_wall) if cold else {}
                finally:
                    tier.stop()
            finally:
                reader.stop()
            first = None if reader.first is None else reader.first - started
            run = Run(name, n, None if reader.last is None else reader.last - started,
                      None if counter_end is None else counter_end - started, first, boot, seen=len(reader.ids))
            if reader.last is None:
                # Short: did the reader miss records, or are they not on the topic?
                run.recounted = recount(self.s.bootstrap, topic, PARTITIONS)
                self.r.say(f"    !! {name}: the reader saw {run.seen:,} of {n:,} distinct events; the tier's counter"
                           f" {'reached' if counter_end else 'did not reach'} {n:,}; a second reader found"
                           f" {run.recounted:,} on the topic")
            return run
        finally:
            self.s.drop_topic(topic)
            self.s.drop_database(url)

    def lock(self) -> None:
        r = self.r
        r.say("\n== claim modes: lock (one write per event) and delete-on-publish, same backlog")
        # The status baseline is measured here, next to the runs it is compared with: on a shared
        # machine the background load of a few minutes earlier is not today's.
        d = self.drain_median("lock-base")
        base = d.rate
        r.add("lock_base", "drain, status (baseline of this comparison)", base, "ev/s",
              r.against(base, r.combined("sql_status_2p"), "status+broker") + f"; CPU {d.cpu_per_1k:.3f} s/1k"
              + spread(d))
        for key, label, env in (
            ("status_delete", "status + delete-on-publish", {"OUTBOX_DELETE_ON_PUBLISH": "true"}),
            ("lock", "lock", {"OUTBOX_CLAIM_MODE": "lock"}),
            ("lock_delete", "lock + delete-on-publish",
             {"OUTBOX_CLAIM_MODE": "lock", "OUTBOX_DELETE_ON_PUBLISH": "true"}),
        ):
            lock_mode = env.get("OUTBOX_CLAIM_MODE") == "lock"
            try:
                d = self.drain_median(key.replace("_", "-"), watch_processing=lock_mode, **env)
            except RuntimeError as exc:
                if lock_mode and "exited with 2" in str(exc):
                    r.add(key, f"drain, {label}", None, "ev/s", "not implemented (the tier refuses the setting)")
                    continue
                raise
            # The status claim writes each row twice (claim, mark), a lock-mode claim once.
            if lock_mode and (d.processing_seen or (d.writes_per_event or 0) > 1.5):
                r.add(key, f"drain, {label}", None, "ev/s",
                      f"not implemented ({d.writes_per_event:.2f} row writes per event: the tier ran"
                      f" the status claim, at {d.rate:,.0f}/s)")
                continue
            sql_key, name = {"status_delete": ("sql_status_2p", "status+broker"),
                             "lock": ("sql_lock_2p", "lock+broker"),
                             "lock_delete": ("sql_lock_delete_2p", "lock+delete+broker")}[key]
            r.add(key, f"drain, {label}", d.rate, "ev/s",
                  r.against(d.rate, r.combined(sql_key), name) + f"; {d.rate / base:.2f} × status drain"
                  + f"; CPU {d.cpu_per_1k:.3f} s/1k; {d.writes_per_event:.2f} row writes/event" + spread(d))
            self._peak_rss(d.peak_rss)
        best = max((r.value(k) or 0.0 for k in ("lock", "lock_delete")), default=0.0)
        if best:
            r.add("lock_ratio", "  best lock-mode drain / status drain", best / base, "x", "target ≥ 2.00")
            r.target("lock mode ≥ 2 × status mode", best / base >= 2.0,
                     f"{best:,.0f} / {base:,.0f} = {best / base:.2f}")
        else:
            r.add("lock_ratio", "  best lock-mode drain / status drain", None, "x", "not implemented")
            r.target("lock mode ≥ 2 × status mode", None, "lock mode not implemented in the tier yet")

    def scale(self) -> None:
        r = self.r
        r.say("\n== scale: 1 supervisor × 2 workers vs 2 supervisors × 1 worker, same backlog")
        one = self.drain_median("scale-1x2", supervisors=1, workers=2)
        r.add("scale_1x2", "drain, 1 supervisor × 2 workers", one.rate, "ev/s",
              r.against(one.rate, r.combined("sql_status_2p"), "status+broker") + spread(one))
        two = self.drain_median("scale-2x1", supervisors=2, workers=1)
        r.add("scale_2x1", "drain, 2 supervisors × 1 worker", two.rate, "ev/s",
              r.against(two.rate, r.combined("sql_status_2p"), "status+broker") + spread(two))
        ratio = two.rate / one.rate
        r.add("scale_ratio", "  2×1 / 1×2", ratio, "x", "target within 15 % (0.85 … 1.15)")
        r.target("2 replicas × 1 within 15 % of 1 × 2 (issue 5)", abs(1 - ratio) <= 0.15, f"{ratio:.2f}")

    def purge(self) -> None:
        r, p = self.r, self.plan
        old = p.backlog
        r.say(f"\n== purge: drain with {old:,} old published rows, "
              "retention purge off vs on (retention 1 s, every 1 s)")
        off = self.drain_median("purge-off", published=old, OUTBOX_RETENTION_SECONDS="0")
        r.add("purge_off", "drain, purge off", off.rate, "ev/s",
              r.against(off.rate, r.combined("sql_status_2p"), "status+broker") + spread(off))
        on = self.drain_median("purge-on", published=old,
                               OUTBOX_RETENTION_SECONDS="1", OUTBOX_PURGE_INTERVAL_SECONDS="1")
        if not on.purged:
            r.add("purge_on", "drain, purge on", on.rate, "ev/s",
                  "purge not implemented (nothing purged during the drain)")
            r.add("purge_ratio", "  purge on / off", None, "x", "not implemented")
            r.target("purge does not slow the claim", None, "the tier purged nothing: not implemented yet")
            return
        ratio = on.rate / off.rate
        r.add("purge_on", "drain, purge on", on.rate, "ev/s",
              f"{on.purged:,.0f} rows purged during the drain" + spread(on))
        r.add("purge_ratio", "  purge on / off", ratio, "x", "target ≥ 0.90 (within noise)")
        r.target("purge does not slow the claim", ratio >= 0.9, f"{ratio:.2f} ({on.purged:,.0f} rows purged meanwhile)")

    def retention(self) -> None:
        from bench import retention

        retention.run(self)

    def pgbouncer(self) -> None:
        from bench import pgbouncer

        pgbouncer.run(self)

    def debezium_write(self) -> None:
        from bench import debezium_write

        debezium_write.run(self)

    def latency(self) -> None:
        r, p = self.r, self.plan
        r.say(f"\n== latency: {p.rate:,.0f} events/s offered through kaireon_pub.enqueue for {p.latency_seconds:g} s"
              " (after a warm-up), OUTBOX_POLL_INTERVAL_MS at its default 2000")
        url, topic = self.s.fresh_database("latency"), self.s.fresh_topic("latency")
        reader = offer = None
        try:
            tier = self.tier(url)
            try:
                reader = TopicLatency(self.s.bootstrap, topic, PARTITIONS)
                reader.start()
                seconds = p.warmup_seconds + p.latency_seconds
                offer = subprocess.Popen([sys.executable, "-m", "bench.offer", url, topic, str(p.rate), str(seconds)],
                                         stdout=subprocess.PIPE, text=True, start_new_session=True)
                assert json.loads(offer.stdout.readline())["event"] == "offer started"
                time.sleep(p.warmup_seconds)
                m0, cpu0, t0 = tier.metrics(), tier.cpu_seconds(), time.time()
                end = time.monotonic() + p.latency_seconds
                while time.monotonic() < end:
                    tier.sample_rss()
                    time.sleep(0.5)
                m1, cpu1, t1 = tier.metrics(), tier.cpu_seconds(), time.time()
                done = json.loads(offer.stdout.readline())
                offer.wait(30)
                time.sleep(1.0)  # the tail of the window reaches the reader
            finally:
                tier.stop()
        finally:
            if offer and offer.poll() is None:
                offer.kill()
            if reader:
                reader.stop()
            self.s.drop_topic(topic)
            self.s.drop_database(url)
        pct, within, count = histogram_percentiles(m0.age_buckets, m1.age_buckets)
        r.add("offered", "offered rate achieved", done["rate"], "ev/s",
              f"{done['sent']:,} events; worst lag behind schedule {done['worstLagSeconds'] * 1000:.0f} ms")
        for q, key in ((0.5, "latency_p50"), (0.95, "latency_p95"), (0.99, "latency_p99")):
            v = pct.get(q)
            r.add(key, f"commit→delivery p{int(q * 100)} (tier histogram)", None if v is None else v * 1000, "ms",
                  f"{count:,} events; {within:.4f} of them ≤ 100 ms" if q == 0.99 else "bucket-interpolated")
        cpct, ccount = reader.percentiles(t0, t1 - 0.5)
        for q in (0.5, 0.95, 0.99):
            v = cpct.get(q)
            r.add(f"consumer_p{int(q * 100)}", f"commit→consumer p{int(q * 100)} (topic reader, upper bound)",
                  None if v is None else v * 1000, "ms", f"{ccount:,} events" if q == 0.5 else "")
        published = m1.published - m0.published
        cpu = (cpu1 - cpu0) / published * 1000 if published else None
        r.add("latency_cpu", f"  tier CPU per 1,000 events at {p.rate:,.0f}/s", cpu, "s/1k", "")
        self._peak_rss(max(tier.peak_rss.values(), default=0))
        if pct.get(0.99) is not None:
            r.target("idle latency p99 ≤ 100 ms at 2,000/s", within >= 0.99,
                     f"p99 ≈ {pct[0.99] * 1000:.0f} ms (histogram; {within:.2%} ≤ 100 ms); consumer-side p99 "
                     f"{cpct.get(0.99, float('nan')) * 1000:.0f} ms; offered {done['rate']:,.0f}/s")


def _watch(tier: Tier, reader: DistinctReader, n: int, started: float, timeout: float) -> float | None:
    """Until the reader has seen every event and the tier's published counter has counted them all
    (it counts after the mark, a moment after the reader may see the last one), or either has had
    10 s more than the other, or the timeout. Returns when the counter reached n (interpolated
    between 0.1 s samples), or None."""
    deadline = started + timeout
    prev_t, prev_n, counter_end = started, 0.0, None
    while True:
        now = time.monotonic()
        if counter_end is None and all(sup.find_port() for sup in tier.sups):
            with contextlib.suppress(OSError):
                done = tier.metrics().published
                if done >= n:
                    counter_end = prev_t + (now - prev_t) * (n - prev_n) / max(done - prev_n, 1)
                prev_t, prev_n = now, done
        finished = reader.last is not None
        if (finished and counter_end is not None) or now > deadline:
            return counter_end
        if (finished and now > reader.last + 10) or (counter_end is not None and now > counter_end + 10):
            return counter_end
        time.sleep(0.1)


def _spread(runs: list[Run], rate) -> str:
    if len(runs) < 2:
        return ""
    return f"; median of {len(runs)}: {min(rate(x) for x in runs):,.0f}–{max(rate(x) for x in runs):,.0f}/s"


def _median_of(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def machine() -> str:
    mem = psutil.virtual_memory().total / 1024 ** 3
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, {mem:.0f} GiB, {platform.platform()}, Python {platform.python_version()}; "
            f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("scenarios", nargs="*", default=["all"], choices=(*SCENARIOS, "all"),
                    help="what to run, in order (default: all = " + " ".join(SCENARIOS) + ")")
    ap.add_argument("--quick", action="store_true", help="tiny backlogs and short windows (the smoke test)")
    ap.add_argument("--database-url", default=os.environ.get("KAIREON_TEST_DATABASE_URL"),
                    help="an existing PostgreSQL (needs CREATEDB); default: embedded")
    ap.add_argument("--broker", choices=BROKERS, default="tansu",
                    help="the broker the bench starts: tansu (embedded, memory storage; the default) or kafka (a"
                         " single-node Apache Kafka, KRaft, from kaireon_pub.devkafka: needs Java and Maven)")
    ap.add_argument("--bootstrap", help="an existing broker instead (then --broker is not started)")
    ap.add_argument("--backlog", type=int, help="drain backlog (default 100,000)")
    ap.add_argument("--big-backlog", type=int, help="the large, dead-tuple backlog (default 1,000,000)")
    ap.add_argument("--ceiling-rows", type=int, help="rows per SQL ceiling loop (default 300,000)")
    ap.add_argument("--retention-old", type=int,
                    help="old published rows to purge in the retention scenario (default 1,000,000)")
    ap.add_argument("--write-transactions", type=int,
                    help="one-event transactions per form in debezium-write (default 5,000; ten-event: half)")
    ap.add_argument("--produce-messages", type=int, help="messages of the produce ceiling (default 500,000)")
    ap.add_argument("--batch", type=int, default=1000, help="OUTBOX_BATCH_SIZE, also the ceiling loops' batch")
    ap.add_argument("--rate", type=float, help="offered events/s in the latency scenario (default 2,000)")
    ap.add_argument("--latency-seconds", type=float, help="latency window (default 30)")
    ap.add_argument("--repeat", type=int, help="runs per 100,000-event drain figure, median reported (default 3)")
    ap.add_argument("--synchronous-commit", default=DEFAULTS["OUTBOX_SYNCHRONOUS_COMMIT"],
                    choices=SYNCHRONOUS_COMMIT_LEVELS,
                    help="OUTBOX_SYNCHRONOUS_COMMIT of the tier, also the SQL ceiling loops' (default: the tier's)")
    ap.add_argument("--tier-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for every tier of the run (OUTBOX_*, KAFKA_*), e.g."
                         " OUTBOX_WORKERS=4 (then every tier runs that many workers) or KAFKA_LINGER_MS=1; repeatable")
    ap.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                    help="a server setting for the run on the embedded server (ALTER SYSTEM, then a reload or a"
                         " restart), e.g. shared_buffers=1GB; repeatable; printed with the results")
    args = ap.parse_args(argv)
    scenarios = list(SCENARIOS) if "all" in args.scenarios else args.scenarios
    plan = plan_from(args)
    report = Report()
    run_dir = Path(tempfile.mkdtemp(prefix="kaireon-bench-"))
    report.say(f"kaireon-pub bench {datetime.now(UTC):%Y-%m-%d %H:%M UTC}: python -m bench "
               + shlex.join(argv if argv is not None else sys.argv[1:]))
    report.say(f"machine: {machine()}")
    failed: list[str] = []
    interrupted = False
    services = None
    try:
        services = Services(args.database_url, args.bootstrap, dict(kv.split("=", 1) for kv in args.pg_setting),
                            broker=args.broker, broker_dir=run_dir / "broker")
        report.say(f"services: {services.describe()}; tier logs under {run_dir}")
        if args.tier_env:
            report.say("tier environment (every tier): " + " ".join(args.tier_env))
        bench = Bench(services, plan, report, run_dir)
        for name in scenarios:
            started = time.monotonic()
            try:
                services.settle()
                getattr(bench, name.replace("-", "_"))()
                report.say(f"  ({name}: {time.monotonic() - started:.0f} s)")
            except (RuntimeError, psycopg.Error, OSError, subprocess.SubprocessError) as exc:
                failed.append(name)
                report.say(f"  !! {name} failed: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        interrupted = True
        report.say("\ninterrupted: what was measured so far follows")
    finally:
        try:
            if services:
                services.close()
        except KeyboardInterrupt:
            interrupted = True
        report.print_targets()
        report.say(report.summary(interrupted, failed))
    return 130 if interrupted else (1 if failed else 0)
