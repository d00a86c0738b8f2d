"""Offered load at a fixed rate, in a process of its own: `python -m bench.offer URL TOPIC RATE SECONDS`.

Events go through kaireon_pub.enqueue_many, the events due now in one small transaction (at
most --per-tx), so every commit sends the NOTIFY that wakes the workers. One round trip per
transaction: with one per event the offering process itself fell behind 2,000/s on 2 busy cores. The
schedule is absolute (event i is due at start + i / rate), so a slow commit is caught up, not lost.
Prints one JSON line: events sent, seconds, the achieved rate and the worst lag behind schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import psycopg

from kaireon_pub import Event, enqueue_many


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.offer")
    ap.add_argument("url")
    ap.add_argument("topic")
    ap.add_argument("rate", type=float)
    ap.add_argument("seconds", type=float)
    ap.add_argument("--per-tx", type=int, default=10)
    args = ap.parse_args(argv)
    noise = [os.urandom(128).hex() for _ in range(64)]
    sent, worst_lag = 0, 0.0
    with psycopg.connect(args.url) as conn:
        print(json.dumps({"event": "offer started"}), flush=True)
        start = time.monotonic()
        end = start + args.seconds
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = int((now - start) * args.rate) - sent
            if due <= 0:
                time.sleep(max(0.0, start + (sent + 1) / args.rate - now))
                continue
            worst_lag = max(worst_lag, due / args.rate)
            take = min(due, args.per_tx)
            enqueue_many(conn, [Event(args.topic, f"agg-{n % 1000}", {"n": n, "aggregate": f"agg-{n % 1000}",
                                                                      "data": noise[n % 64]}, event_type="bench.event")
                                for n in range(sent, sent + take)])
            conn.commit()
            sent += take
        elapsed = time.monotonic() - start
    print(json.dumps({"event": "offer done", "sent": sent, "seconds": round(elapsed, 3),
                      "rate": round(sent / elapsed, 1), "worstLagSeconds": round(worst_lag, 4)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
