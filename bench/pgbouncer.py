"""The `pgbouncer` scenario: the 100,000-event drain direct, and through a real PgBouncer in
pool_mode=transaction (OUTBOX_POOL_MODE=transaction), in the same run.

The runs are interleaved (direct, pooled with LISTEN on a direct OUTBOX_LISTEN_DATABASE_URL,
pooled polling; then again), each on a fresh database and topic, so that a change in the
machine's background load hits every variant alike; each figure is the median of `--repeat`.
PgBouncer is the Debian package (1.18) started by tests/pgbouncer.py on a free loopback port, with
a pool large enough (20 server connections per database) that the tier never waits for one: what
is measured is the extra hop and the per-transaction settings, not pool starvation. Its own CPU
per 1,000 events is printed beside the tier's. Without pgbouncer installed the scenario reports
"not measured" and the run goes on.
"""

from __future__ import annotations

import psutil

from bench import backlog
from bench.tier import drain

POOL_SIZE = 20


def run(bench) -> None:
    from tests.pgbouncer import SKIP_REASON, PgBouncer, binary

    r, n = bench.r, bench.plan.backlog
    r.say(f"\n== pgbouncer: the {n:,}-event drain direct vs through PgBouncer (pool_mode=transaction), interleaved")
    if binary() is None:
        r.add("pgb_ratio", "  drain through PgBouncer / direct", None, "x", f"not measured: {SKIP_REASON}")
        return
    bouncer = PgBouncer(bench.s.pg.admin_url, pool_mode="transaction", pool_size=POOL_SIZE)
    try:
        version = bouncer.admin("SHOW VERSION")[0][0]
        runs: dict[str, list] = {"direct": [], "listen": [], "poll": []}
        for _ in range(bench.plan.repeat):
            for variant in runs:
                runs[variant].append(_drain(bench, bouncer, variant))
    finally:
        bouncer.stop()
    runs_in_order = {variant: list(done) for variant, done in runs.items()}
    medians = {}
    for variant, done in runs.items():
        done.sort(key=lambda d: d.rate)
        median = done[len(done) // 2]
        median.rates = tuple(d.rate for d in done)
        medians[variant] = median
        bench._peak_rss(max(d.peak_rss for d in done))
    direct = medians["direct"]
    r.add("pgb_direct", "drain, direct (baseline of this comparison)", direct.rate, "ev/s",
          f"tier CPU {direct.cpu_per_1k:.3f} s/1k{_db_cpu(runs['direct'])}"
          + (f"; {direct.spread}" if direct.spread else ""))
    for variant, label in (("listen", "through PgBouncer, LISTEN on the direct URL"),
                           ("poll", "through PgBouncer, polling (2 s)")):
        d = medians[variant]
        # Each round's pooled run against the direct run just before it: the background load of
        # a shared machine drifts more slowly than one round.
        paired = sorted(p.rate / q.rate for p, q in zip(runs_in_order[variant], runs_in_order["direct"], strict=True))
        r.add(f"pgb_{variant}", f"drain, {label}", d.rate, "ev/s",
              f"{d.rate / direct.rate:.2f} × direct (paired by round: median {paired[len(paired) // 2]:.2f}, "
              f"{paired[0]:.2f}–{paired[-1]:.2f}); tier CPU {d.cpu_per_1k:.3f} s/1k{_db_cpu(runs[variant])}; "
              f"{version} CPU {d.bouncer_cpu_per_1k:.3f} s/1k" + (f"; {d.spread}" if d.spread else ""))
    ratio = medians["listen"].rate / direct.rate if direct.rate else None
    r.add("pgb_ratio", "  drain through PgBouncer / direct", ratio, "x",
          "LISTEN on OUTBOX_LISTEN_DATABASE_URL; the polling run starts up to one poll interval late")


def _db_cpu(done: list) -> str:
    """The PostgreSQL backends' CPU per 1,000 events (median), when the server runs on this machine."""
    values = sorted(d.db_cpu_per_1k for d in done if d.db_cpu_per_1k is not None)
    return f"; PostgreSQL backends {values[len(values) // 2]:.3f} s/1k" if values else ""


def _drain(bench, bouncer, variant: str):
    s, n = bench.s, bench.plan.backlog
    url, topic = s.fresh_database(f"pgb-{variant}"), s.fresh_topic(f"pgb-{variant}")
    try:
        env: dict[str, str] = {}
        if variant != "direct":
            env = {"DATABASE_URL": bouncer.url_for(url), "OUTBOX_POOL_MODE": "transaction"}
            if variant == "listen":
                env["OUTBOX_LISTEN_DATABASE_URL"] = url
        tier = bench.tier(url, **env)  # monitored on the direct URL, run on DATABASE_URL
        proc = psutil.Process(bouncer.proc.pid)
        try:
            before = sum(proc.cpu_times()[:2])
            result = drain(tier, lambda: backlog.load(url, topic, n), n)
            result.bouncer_cpu_per_1k = (sum(proc.cpu_times()[:2]) - before) / n * 1000
        finally:
            tier.stop()
        return result
    finally:
        s.drop_topic(topic)
        s.drop_database(url)
