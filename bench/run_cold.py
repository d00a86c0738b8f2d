"""The `cold` scenario: the tier spawned against a backlog already committed, beside a warm drain of
the same backlog, both timed to the last distinct event on the topic (a reader counting them, the
tier's counter as the fallback), alternating `--repeat` times at `--backlog` and once at the big
backlog (not in --quick); the first publish after the spawn and the steps of the tier's boot. The
reader and the boot steps: bench/cold.py."""

from __future__ import annotations

import contextlib
import time

from bench import backlog
from bench.cold import DistinctReader, Run, boot_steps, recount
from bench.env import PARTITIONS
from bench.tier import Tier


def run(bench) -> None:
    r, p = bench.r, bench.plan
    sizes = [p.backlog, *([p.big_backlog] if p.cold_big else [])]
    for n in sizes:
        small = n == p.backlog
        repeat = p.repeat if small else 1
        r.say(f"\n== cold start: 1 supervisor × 2 workers spawned against {n:,} events already committed,"
              f" beside a warm drain of the same backlog; both timed to the last distinct event id on the topic"
              f" (a reader counting them){f', {repeat} of each, alternating' if repeat > 1 else ''}")
        warm_runs, cold_runs = [], []
        for _ in range(repeat):
            warm_runs.append(cold_once(bench, n, cold=False))
            cold_runs.append(cold_once(bench, n, cold=True))
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


def cold_once(bench, n: int, *, cold: bool) -> Run:
    """A fresh database and topic; cold: the backlog committed, then the tier spawned; warm:
    the tier started and balanced, then the backlog committed. Timed by a reader of the topic."""
    name = "cold" if cold else "warm"
    url, topic = bench.s.fresh_database(name), bench.s.fresh_topic(name)
    try:
        if cold:
            backlog.load(url, topic, n, notify=False)
        reader = DistinctReader(bench.s.bootstrap, topic, PARTITIONS, n)
        reader.start()
        try:
            reader.wait_ready()
            spawn_wall = time.time()
            started = time.monotonic()
            tier = bench.tier(url, ready=not cold)
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
            run.recounted = recount(bench.s.bootstrap, topic, PARTITIONS)
            bench.r.say(f"    !! {name}: the reader saw {run.seen:,} of {n:,} distinct events; the tier's counter"
                        f" {'reached' if counter_end else 'did not reach'} {n:,}; a second reader found"
                        f" {run.recounted:,} on the topic")
        return run
    finally:
        bench.s.drop_topic(topic)
        bench.s.drop_database(url)


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
