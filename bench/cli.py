"""`python -m bench [drain|cold|latency|ceilings|scale|purge|lock|retention|debezium-write|all ...] [options]`: runs the
scenarios in order against one PostgreSQL and one broker, prints every figure as it is measured,
the targets of issues 5 and 6, and one SUMMARY line, also when interrupted with Ctrl-C."""

from __future__ import annotations

import argparse
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
from bench.env import BROKERS, Services
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

    def _peak_rss(self, rss: int) -> None:
        # Kept quietly and printed once in the summary: the max over every scenario's workers.
        peak = max(rss / MB, self.r.value("peak_rss") or 0.0)
        self.r.figures["peak_rss"] = Figure("peak_rss", "peak worker RSS (all scenarios)", peak, "MB")

    # ---- scenarios: each in a module of its own behind run(bench); drain also runs the big backlog --

    def ceilings(self) -> None:
        from bench import run_ceilings

        run_ceilings.run(self)

    def drain(self) -> None:
        from bench import run_drain

        run_drain.run(self)

    def cold(self) -> None:
        from bench import run_cold

        run_cold.run(self)

    def lock(self) -> None:
        from bench import run_lock

        run_lock.run(self)

    def scale(self) -> None:
        from bench import run_scale

        run_scale.run(self)

    def purge(self) -> None:
        from bench import run_purge

        run_purge.run(self)

    def retention(self) -> None:
        from bench import retention

        retention.run(self)

    def latency(self) -> None:
        from bench import run_latency

        run_latency.run(self)

    def pgbouncer(self) -> None:
        from bench import pgbouncer

        pgbouncer.run(self)

    def debezium_write(self) -> None:
        from bench import debezium_write

        debezium_write.run(self)


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
