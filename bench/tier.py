"""The real tier under measurement: `python -m kaireon_pub run` processes, their metrics, CPU and RSS.

Progress is read from the tier's own counter kaireon_outbox_processed_total{outcome="published"}
(scraping /metrics costs the database nothing); the drain ends when the counter reaches the
backlog, interpolated between samples, and the database then confirms that no row is pending.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from kaireon_pub import devtier

SAMPLE_S = 0.2


class Supervisor(devtier.Tier):
    """One `kaireon-pub run` of the bench (the tests' Tier): its port once logged, its /metrics."""

    def __init__(self, env: dict[str, str], log_path: Path):
        super().__init__(env, log_path)
        self.port: int | None = None

    def find_port(self) -> int | None:
        if self.port is None:
            self.port = self.logged_port()
        return self.port

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, up to `timeout` s for the drain, then whatever is left of it killed."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            super().stop(timeout=timeout)


@dataclass
class Metrics:
    published: float = 0.0
    purged: float = 0.0
    age_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


def parse_metrics(texts: list[str]) -> Metrics:
    m = Metrics()
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "kaireon_outbox_processed_total" and s.labels.get("outcome") == "published":
                    m.published += s.value
                elif s.name == "kaireon_outbox_purged_total":
                    m.purged += s.value
                elif s.name == "kaireon_outbox_event_age_seconds_bucket":
                    le = float(s.labels["le"])
                    m.age_buckets[le] = m.age_buckets.get(le, 0.0) + s.value
    return m


class Tier:
    """`supervisors` × `workers` of the real tier against one database."""

    def __init__(self, db_url: str, bootstrap: str, run_dir: Path, *, supervisors: int = 1,
                 workers: int = 2, **overrides: str):
        self.db_url = db_url
        workers = int(overrides.pop("OUTBOX_WORKERS", workers))  # --tier-env OUTBOX_WORKERS=N
        self.workers_total = supervisors * workers
        self.sups = []
        for i in range(supervisors):
            d = run_dir / f"sup{i}"
            d.mkdir(parents=True, exist_ok=True)
            env = devtier.tier_env(db_url, bootstrap, d, OUTBOX_WORKERS=str(workers), **overrides)
            self.sups.append(Supervisor(env, d / "tier.log"))
        self.peak_rss: dict[int, int] = {}
        self._procs: dict[int, psutil.Process] = {}

    def wait_ready(self, timeout: float = 60, balanced: bool = True) -> None:
        """Every supervisor serves /metrics and the workers share the shards (devtier.is_balanced; a
        tier that just started has one worker holding all 256 for up to a lease period). Not
        `balanced`: every shard is owned, however the owners split them."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while True:
                for sup in self.sups:
                    if sup.proc.poll() is not None:
                        raise RuntimeError(f"the tier exited with {sup.proc.returncode}; see {sup.log_path}")
                ports = all(sup.find_port() for sup in self.sups)
                shares = devtier.shard_shares(conn)
                counts = sorted(shares.values())
                fair_share = devtier.is_balanced(shares, self.workers_total)
                if ports and sum(counts) == devtier.SHARDS and (fair_share or not balanced):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the tier did not balance its shards within {timeout} s: {counts}")
                time.sleep(0.1)

    def metrics(self) -> Metrics:
        return parse_metrics([sup.metrics_text() for sup in self.sups])

    def processes(self) -> list[psutil.Process]:
        out = []
        for sup in self.sups:
            for pid in [sup.proc.pid, *(c.pid for c in _children(sup.proc.pid))]:
                proc = self._procs.get(pid)
                if proc is None:
                    with contextlib.suppress(psutil.Error):
                        proc = self._procs[pid] = psutil.Process(pid)
                if proc is not None:
                    out.append(proc)
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU of every process of the tier (supervisors, workers, HTTP children)."""
        total = 0.0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    def sample_rss(self) -> None:
        for sup in self.sups:
            for pid in sup.worker_pids().values():
                with contextlib.suppress(psutil.Error):
                    rss = psutil.Process(pid).memory_info().rss
                    self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), rss)

    def stop(self) -> None:
        for sup in self.sups:
            if sup.proc.poll() is None:
                sup.proc.send_signal(signal.SIGTERM)
        for sup in self.sups:
            sup.stop()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


class DbCpu:
    """CPU of the PostgreSQL backends serving the tier (when the server runs on this machine)."""

    def __init__(self, db_url: str):
        self.db_url = db_url
        self.procs: dict[int, psutil.Process] = {}

    def refresh(self) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            pids = [p for (p,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'kaireon-pub%'"
                " AND datname = current_database()")]
        for pid in pids:
            if pid not in self.procs:
                with contextlib.suppress(psutil.Error):
                    self.procs[pid] = psutil.Process(pid)

    def seconds(self) -> float | None:
        if not self.procs:
            return None
        total = 0.0
        for proc in self.procs.values():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total


@dataclass
class Drain:
    events: int
    seconds: float
    tier_cpu: float
    db_cpu: float | None
    peak_rss: int
    processing_seen: int  # rows seen in status 'processing' (a lock-mode claim leaves none)
    purged: float
    writes_per_event: float | None = None  # row updates + deletes per event, once the tier stopped
    rates: tuple[float, ...] = ()  # every run's rate when this is the median of several

    @property
    def spread(self) -> str:
        """"median of 3: 28,100–31,400/s" for a repeated drain, "" for a single one."""
        if len(self.rates) < 2:
            return ""
        return f"median of {len(self.rates)}: {min(self.rates):,.0f}–{max(self.rates):,.0f}/s"

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_1k(self) -> float:
        return self.tier_cpu / self.events * 1000

    @property
    def db_cpu_per_1k(self) -> float | None:
        return None if self.db_cpu is None else self.db_cpu / self.events * 1000


def drain(tier: Tier, load, events: int, *, watch_processing: bool = False, timeout: float | None = None) -> Drain:
    """`load()` commits `events` pending rows and returns the monotonic time of its commit;
    the drain is timed from that commit until the tier has published them all."""
    timeout = timeout or max(120.0, events / 1000)
    base = tier.metrics()
    dbcpu = DbCpu(tier.db_url)
    dbcpu.refresh()
    committed = load()
    cpu0, db0 = tier.cpu_seconds(), dbcpu.seconds()
    processing_seen = 0
    prev_t, prev_n = committed, 0.0
    with psycopg.connect(tier.db_url, autocommit=True) as conn:
        while True:
            time.sleep(SAMPLE_S)
            now = time.monotonic()
            m = tier.metrics()
            done = m.published - base.published
            tier.sample_rss()
            if watch_processing:
                n = conn.execute("SELECT count(*) FROM outbox_events WHERE status = 'processing'").fetchone()[0]
                processing_seen = max(processing_seen, n)
            if done >= events:
                # The counter crossed the backlog between two samples: interpolate the crossing.
                end = prev_t + (now - prev_t) * (events - prev_n) / max(done - prev_n, 1)
                break
            if now - committed > timeout:
                raise RuntimeError(f"drain incomplete after {timeout:.0f} s: {done:.0f}/{events} published")
            prev_t, prev_n = now, done
        pending = conn.execute("SELECT count(*) FROM outbox_events WHERE status = 'pending'").fetchone()[0]
    if pending:
        raise RuntimeError(f"the counter says drained but {pending} rows are still pending")
    cpu1, db1 = tier.cpu_seconds(), dbcpu.seconds()
    return Drain(events=events, seconds=end - committed, tier_cpu=cpu1 - cpu0,
                 db_cpu=None if db0 is None or db1 is None else db1 - db0,
                 peak_rss=max(tier.peak_rss.values(), default=0),
                 processing_seen=processing_seen, purged=m.purged - base.purged)


def row_writes(db_url: str) -> int:
    """Updates + deletes of outbox_events so far (flushed by backends that have exited): the
    status claim writes each row twice, the lock claim once."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT n_tup_upd + n_tup_del FROM pg_stat_user_tables"
                           " WHERE relname = 'outbox_events'").fetchone()
    return int(row[0]) if row else 0
