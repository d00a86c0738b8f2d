"""`kaireon-pub top`: a live view of a running tier, from its /metrics (and /readyz) endpoint.

Rates and the p99 age at publish are computed between two scrapes (counter and histogram-bucket
deltas), so the first frame comes one interval after start. Works against any replica's HTTP
port; the backlog figures are the database's, the rates that replica's.
"""

from __future__ import annotations

import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

CLEAR = "\x1b[H\x1b[2J"
TIMEOUT_SECONDS = 2.0


@dataclass
class Snapshot:
    at: float
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=lambda: defaultdict(list))
    ready: dict[str, object] | None = None
    error: str | None = None

    def value(self, name: str, **labels: str) -> float | None:
        found = [v for lab, v in self.samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
        return sum(found) if found else None

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for lab, v in self.samples.get(name, []):
            if label in lab:
                out[lab[label]] += v
        return dict(out)


def scrape(url: str) -> Snapshot:
    from prometheus_client.parser import text_string_to_metric_families

    snap = Snapshot(at=time.monotonic())
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as resp:
            text = resp.read().decode()
    except (OSError, urllib.error.URLError) as exc:
        snap.error = f"cannot scrape {url}: {exc}"
        return snap
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            snap.samples[s.name].append((dict(s.labels), s.value))
    snap.ready = readiness(url)
    return snap


def readiness(metrics_url: str) -> dict[str, object] | None:
    """The tier's /readyz beside its /metrics (503 bodies carry the checks too)."""
    parts = urllib.parse.urlsplit(metrics_url)
    url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/readyz", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS + 1) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return orjson.loads(exc.read())
        except orjson.JSONDecodeError:
            return None
    except (OSError, orjson.JSONDecodeError):
        return None


def rate(prev: Snapshot, cur: Snapshot, name: str, **labels: str) -> float | None:
    a, b = prev.value(name, **labels), cur.value(name, **labels)
    if b is None or cur.at <= prev.at:
        return None
    # A restarted process resets its counters: count from zero rather than go negative.
    delta = b - (a or 0.0) if a is not None and b >= a else b
    return delta / (cur.at - prev.at)


def quantile(prev: Snapshot, cur: Snapshot, name: str, q: float) -> float | None:
    """The q-quantile of a histogram's observations between two scrapes (bucket upper bound)."""
    def buckets(s: Snapshot) -> dict[float, float]:
        out: dict[float, float] = defaultdict(float)
        for lab, v in s.samples.get(f"{name}_bucket", []):
            out[float(lab["le"])] += v
        return out

    before, after = buckets(prev), buckets(cur)
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    if not delta or delta[-1][1] <= 0:
        return None
    target = q * delta[-1][1]
    for le, count in delta:
        if count >= target:
            return le
    return None


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "> 1 h"
    return f"{seconds:.2f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render(prev: Snapshot, cur: Snapshot, url: str) -> str:
    lines = [f"kaireon-pub top  {url}  {time.strftime('%H:%M:%S')}", ""]
    if cur.error:
        return "\n".join([*lines, cur.error, "", "retrying every interval; Ctrl-C to quit"])
    published = rate(prev, cur, "kaireon_outbox_processed_total", outcome="published")
    lines.append(f"events/s        {_num(published, '{:,.1f}')}   "
                 f"retried/s {_num(rate(prev, cur, 'kaireon_outbox_processed_total', outcome='retried'), '{:,.1f}')}   "
                 f"failed/s {_num(rate(prev, cur, 'kaireon_outbox_processed_total', outcome='failed'), '{:,.1f}')}")
    estimated = cur.value("kaireon_outbox_pending_count_estimated")
    lines.append(f"backlog         {_num(cur.value('kaireon_outbox_pending_count'))}"
                 f"{' (estimate)' if estimated else ''}   "
                 f"oldest pending {_age(cur.value('kaireon_outbox_oldest_pending_age_seconds'))}")
    p50 = quantile(prev, cur, "kaireon_outbox_event_age_seconds", 0.5)
    p99 = quantile(prev, cur, "kaireon_outbox_event_age_seconds", 0.99)
    lines.append(f"age at publish  p50 <= {_age(p50)}   p99 <= {_age(p99)}")
    lines.append(f"in flight       {_num(cur.value('kaireon_outbox_in_flight'))}   "
                 f"producer queue {_num(cur.value('kaireon_outbox_producer_queue_depth'))}")
    lines.append(f"failed events   {_num(cur.value('kaireon_outbox_failed_count'))} parked   "
                 f"tick failures/s {_num(rate(prev, cur, 'kaireon_outbox_tick_failures_total'), '{:,.2f}')}")
    last = cur.value("kaireon_outbox_last_success_timestamp_seconds")
    since = f"{max(0.0, time.time() - last):.1f} s ago" if last else "never"
    ready = cur.ready or {}
    checks = ready.get("checks") or {}
    state = "ready" if ready.get("status") == "ready" else "NOT READY" if ready else "unknown"
    lines.append(f"readiness       {state}   "
                 + "   ".join(f"{k} {'up' if v else 'DOWN'}" for k, v in sorted(checks.items()))
                 + f"   last successful tick {since}")

    restarts = cur.by_label("kaireon_outbox_worker_restarts_total", "reason")
    lines += ["", f"workers alive   {_num(cur.value('kaireon_outbox_workers_alive'))}   restarts: "
              + (", ".join(f"{r} {int(n)}" for r, n in sorted(restarts.items())) or "none")]
    owned = cur.by_label("kaireon_outbox_shards_owned", "worker")
    for worker in sorted(owned, key=lambda w: int(w) if w.isdigit() else 0):
        lines.append(f"  worker {worker:>2}     {int(owned[worker]):>3} shards")
    groups = cur.by_label("kaireon_outbox_pending_by_shard_group", "group")
    if groups:
        lines += ["", "pending by shard group (16 shards each)"]
        ordered = [groups.get(str(g), 0.0) for g in range(16)]
        lines.append("  " + " ".join(f"{int(n):>6}" for n in ordered[:8]))
        lines.append("  " + " ".join(f"{int(n):>6}" for n in ordered[8:]))
    lines += ["", "Ctrl-C to quit"]
    return "\n".join(lines)


def run(url: str, interval: float, *, once: bool = False,
        write: Callable[[str], None] = sys.stdout.write) -> int:
    prev = scrape(url)
    try:
        while True:
            time.sleep(interval)
            cur = scrape(url)
            frame = render(prev, cur, url)
            write(frame + "\n" if once else CLEAR + frame + "\n")
            sys.stdout.flush()
            if once:
                return 1 if cur.error else 0
            if not cur.error:
                prev = cur
    except KeyboardInterrupt:
        return 0
