"""The `latency` scenario: `--rate` events/s offered through kaireon_pub.enqueue (bench/offer.py,
a process of its own) for `--latency-seconds` after a warm-up, to a tier polling at its default
interval; commit → delivery percentiles from the tier's histogram (the target's figure) and
commit → consumer from a topic reader, and the tier's CPU per event at that rate. The histogram
arithmetic and the reader: bench/latency.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.env import PARTITIONS
from bench.latency import TopicLatency, histogram_percentiles


def run(bench) -> None:
    r, p = bench.r, bench.plan
    r.say(f"\n== latency: {p.rate:,.0f} events/s offered through kaireon_pub.enqueue for {p.latency_seconds:g} s"
          " (after a warm-up), OUTBOX_POLL_INTERVAL_MS at its default 2000")
    url, topic = bench.s.fresh_database("latency"), bench.s.fresh_topic("latency")
    reader = offer = None
    try:
        tier = bench.tier(url)
        try:
            reader = TopicLatency(bench.s.bootstrap, topic, PARTITIONS)
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
        bench.s.drop_topic(topic)
        bench.s.drop_database(url)
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
    bench._peak_rss(max(tier.peak_rss.values(), default=0))
    if pct.get(0.99) is not None:
        r.target("idle latency p99 ≤ 100 ms at 2,000/s", within >= 0.99,
                 f"p99 ≈ {pct[0.99] * 1000:.0f} ms (histogram; {within:.2%} ≤ 100 ms); consumer-side p99 "
                 f"{cpct.get(0.99, float('nan')) * 1000:.0f} ms; offered {done['rate']:,.0f}/s")
