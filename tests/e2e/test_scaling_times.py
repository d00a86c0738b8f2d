"""Scale-out and scale-in of real tiers, timed: what docs/operations.md ("Scaling out and in") quotes.

Two supervisors of two workers each (the chart's default), the default lease TTL (10 s) and
poll interval (2 s), a steady load. Tier A runs throughout; tier B joins and leaves ROUNDS times by SIGTERM (a
Kubernetes scale-in or rollout), then once more and is SIGKILLed (a node lost). Times are from
the database's view, sampled every 20 ms:

- join: from B's process start to its workers' registration, and from registration to B holding
  its fair share (128 of 256) and A the other 128;
- leave: from SIGTERM to B holding no live lease, and to A holding all 256;
- kill: from SIGKILL to A holding all 256 (the killed leases expire first).

The last line printed is the summary (`pytest -s` shows it); the asserts are loose bounds.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time

import psycopg
import pytest

from tests.helpers import Load, shard_shares, status_counts, wait_for

pytestmark = pytest.mark.broker_agnostic("shard leases are the database's")

ROUNDS = 3
TTL = 10  # the tier's default OUTBOX_LEASE_TTL_SECONDS
POLL_MS = 2000  # the tier's and the chart's default OUTBOX_POLL_INTERVAL_MS (the other tests use 200)
SAMPLE_S = 0.02


def held(conn: psycopg.Connection) -> dict[str, int]:
    return shard_shares(conn)


def registered(conn: psycopg.Connection) -> set[str]:
    live = conn.execute("SELECT worker_id FROM outbox_workers WHERE expires_at > clock_timestamp()")
    return {str(w) for (w,) in live}


def until(condition, timeout: float, what: str) -> float:
    """Seconds until condition() holds, sampled every SAMPLE_S."""
    start = time.monotonic()
    wait_for(condition, timeout, what, interval=SAMPLE_S)
    return time.monotonic() - start


def commit() -> str:
    """The commit measured: KAIREON_COMMIT when the tree is an export, else the checkout's HEAD."""
    if os.environ.get("KAIREON_COMMIT"):
        return os.environ["KAIREON_COMMIT"]
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__))
    return done.stdout.strip() or "unknown"


def test_scale_out_and_in_times(db_url, topic, start_tier):
    def start(name: str):
        return start_tier(name=name, OUTBOX_WORKERS="2", OUTBOX_LEASE_TTL_SECONDS=str(TTL),
                          OUTBOX_POLL_INTERVAL_MS=str(POLL_MS))

    times: dict[str, list[float]] = {"start_to_registered": [], "registered_to_share": [], "sigterm_to_released": [],
                                     "sigterm_to_taken": [], "sigterm_to_exit": [], "sigkill_to_taken": []}
    with psycopg.connect(db_url, autocommit=True) as conn, Load(db_url, topic, keys=200) as load:
        a = start("a")
        wait_for(lambda: sum(held(conn).values()) == 256 and len(held(conn)) == 2, 60, "tier A holding 256 shards")
        a_workers = a.worker_ids()

        def share(workers: set[str]) -> int:
            return sum(n for w, n in held(conn).items() if w in workers)

        for round_ in range(ROUNDS + 1):
            started = time.monotonic()
            b = start(f"b{round_}")
            wait_for(lambda: len(b.worker_ids()) == 2, 30, "tier B's workers spawned", interval=SAMPLE_S)  # noqa: B023
            b_workers = b.worker_ids()
            until(lambda: b_workers & registered(conn), 30, "tier B registered")  # noqa: B023
            times["start_to_registered"].append(time.monotonic() - started)
            times["registered_to_share"].append(until(
                lambda: share(b_workers) == 128 and share(a_workers) == 128,  # noqa: B023
                4 * TTL, "a fair share each"))
            if round_ < ROUNDS:
                b.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                until(lambda: share(b_workers) == 0, 4 * TTL, "tier B's leases released")  # noqa: B023
                times["sigterm_to_released"].append(time.monotonic() - signalled)
                until(lambda: share(a_workers) == 256, 4 * TTL, "tier A holding all 256")
                times["sigterm_to_taken"].append(time.monotonic() - signalled)
                assert b.wait_exit(30) == 0
                times["sigterm_to_exit"].append(time.monotonic() - signalled)
            else:
                os.killpg(b.proc.pid, signal.SIGKILL)
                times["sigkill_to_taken"].append(
                    until(lambda: share(a_workers) == 256, 4 * TTL, "tier A holding all 256"))
        committed = load.stop()
    wait_for(lambda: status_counts(db_url) == {"published": len(committed)}, 120, "every committed event published")
    assert a.stop() == 0

    summary = {name: {"median": round(statistics.median(v), 2), "max": round(max(v), 2), "n": len(v)}
               for name, v in times.items()}
    print("\nscaling times at", commit(), f"(2 workers per tier, TTL {TTL} s, poll {POLL_MS} ms):", json.dumps(summary))
    assert summary["registered_to_share"]["max"] < 2 * TTL + 5
    assert summary["sigterm_to_taken"]["max"] < 5
    assert summary["sigkill_to_taken"]["max"] <= 2 * TTL + 2
