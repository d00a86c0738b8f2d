"""The lease keeper's clock seen from outside (issue 25, case 6).

6e: a worker whose claim came back past its lease's cut-off (the worker paused, here by SIGSTOP,
after the server committed its claim and before it read the reply) must not hand that batch to the
broker: the shards' next owner has taken them over meanwhile and published the rows. The claim is
held on the server by a statement trigger that waits on an advisory lock the test holds (a slow
server), so the worker is certainly stopped with its claim in flight. The proof is the topic read
back: every event exactly once.

6i: with 3 workers (256 shards: two hold 86, one 84 for good), once the shards are shared every
worker's lease rounds come at the normal interval (TTL/3), not every 0.5 s. A round registers the
worker again: its `outbox_workers.expires_at` (the database's clock plus the TTL) moves at each
round, so the gaps between successive values are the gaps between its rounds.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg
import pytest

from tests.helpers import (
    commit_events,
    event_ids,
    metric_value,
    row_summary,
    status_counts,
    wait_balanced,
    wait_for,
)

pytestmark = pytest.mark.broker_agnostic("the lease's clock and the claim are the worker's and the database's")

GATE = 4252  # the advisory lock the test holds while the worker's claim waits on it


def install_claim_gate(db: psycopg.Connection) -> None:
    """A BEFORE UPDATE row trigger on outbox_events that makes a claim of pending rows wait while the
    test holds GATE (a claim that finds nothing, and every other update, pass)."""
    db.execute(f"""
        CREATE FUNCTION test_claim_gate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock_shared({GATE});
            RETURN NEW;
        END $$""")
    db.execute("CREATE TRIGGER test_claim_gate BEFORE UPDATE ON outbox_events FOR EACH ROW "
               "WHEN (OLD.status = 'pending' AND NEW.status = 'processing') EXECUTE FUNCTION test_claim_gate()")


def waiting_on_gate(db: psycopg.Connection) -> list[int]:
    """The backends waiting on an advisory lock (the test's own sessions never wait on one)."""
    return [r[0] for r in db.execute(
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' "
        "AND datname = current_database() AND pid <> pg_backend_pid()")]


def processing(db: psycopg.Connection) -> int:
    return db.execute("SELECT count(*) FROM outbox_events WHERE status = 'processing'").fetchone()[0]


def test_a_claim_that_comes_back_past_the_lease_cut_off_is_not_handed_to_the_broker(
        db_url, topic, start_tier, topic_reader):
    ttl = 3
    # The reaper far away: only the takeover returns the frozen worker's rows. The supervisor does
    # not replace a worker frozen for a few seconds. linger.ms=0 (a latency setting): a batch handed
    # over leaves at once, before the purge at the cut-off can take it back (with the tier's 5 ms the
    # purge mostly wins, and a batch produced past its lease would leave no copy to see).
    env = {"OUTBOX_LEASE_TTL_SECONDS": str(ttl), "OUTBOX_REAPER_STALENESS_SECONDS": "600",
           "OUTBOX_WORKER_TIMEOUT_SECONDS": "60", "KAFKA_LINGER_MS": "0"}
    tier_a = start_tier(name="a", **env)
    commit_events(db_url, topic, 1, keys=1, phase="warm-up", key_prefix="warm-")
    wait_for(lambda: status_counts(db_url) == {"published": 1}, 30, "the warm-up event published")
    port_a = tier_a.http_port()
    frozen = tier_a.worker_pids()[0]

    with psycopg.connect(db_url, autocommit=True) as db, psycopg.connect(db_url, autocommit=True) as holder:
        install_claim_gate(db)
        holder.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        ids = commit_events(db_url, topic, 20, keys=5, phase="cut-off")
        wait_for(lambda: waiting_on_gate(db), 10, "A's claim waiting on the server")
        # A pauses with its claim in flight; the server then commits the claim, its reply unread.
        os.kill(frozen, signal.SIGSTOP)
        try:
            holder.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
            wait_for(lambda: processing(db) == 20, 10, "A's claim committed on the server")
            db.execute("DROP TRIGGER test_claim_gate ON outbox_events")
            # B takes A's shards once A's leases expire, resets the claimed rows and publishes them.
            tier_b = start_tier(name="b", **env)
            try:
                wait_for(lambda: status_counts(db_url) == {"published": 21}, 30,
                         "the frozen worker's rows published by the shards' next owner")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; rows: {row_summary(db_url)}") from None
            # B took them over: the rows A had claimed went back to pending when B took their shards.
            reset = sum(e.get("resetRows", 0) for e in tier_b.logs() if e.get("event") == "rebalance")
            assert reset == 20, f"B reset {reset} rows of A's claim at its takeover"
        finally:
            os.kill(frozen, signal.SIGCONT)

    # A reads its claim's reply now, past its lease: the batch goes back unhanded (the tick fails,
    # transient), where without the check it was produced (and, unconfirmed at the cut-off, purged).
    decided = tier_a.wait_log(lambda e: e.get("event") in ("tick failed", "lease lost"), 20,
                              "A's outcome of its stale batch")
    messages = topic_reader(topic).read_ids(ids, 30, extra=1.0)
    seen = event_ids(messages)
    copies = {i: seen.count(i) for i in ids if seen.count(i) != 1}
    assert not copies, f"events not exactly once on the topic (id: copies): {copies}; A logged {decided}"
    assert decided["event"] == "tick failed" and "lease ended before the batch was handed over" in decided["error"], \
        decided
    assert decided["isTransient"] is True
    # Nothing left in processing, nothing counted as lost: A handed nothing over.
    assert status_counts(db_url) == {"published": 21}
    assert (metric_value(port_a, "kaireon_outbox_lease_lost_total") or 0) == 0
    assert (metric_value(port_a, "kaireon_outbox_unconfirmed_total") or 0) == 0
    assert tier_a.proc.poll() is None and tier_b.proc.poll() is None
    assert tier_b.stop() == 0
    assert tier_a.stop() == 0


class RegistrationSampler(threading.Thread):
    """Reads every worker's registration expiry every 50 ms for `window` seconds: each new value is
    one lease round (the database's clock, so the gaps between values are the rounds' gaps)."""

    def __init__(self, db_url: str, window: float):
        super().__init__(daemon=True)
        self.db_url, self.window = db_url, window
        self.first: dict[str, object] = {}
        self.rounds: dict[str, list] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                until = time.monotonic() + self.window
                stop = threading.Event()
                while time.monotonic() < until:
                    for worker, expires in conn.execute("SELECT worker_id::text, expires_at FROM outbox_workers"):
                        if worker not in self.first:
                            self.first[worker] = expires  # a round before the window
                        elif expires != self.first[worker] and expires not in self.rounds.setdefault(worker, []):
                            self.rounds[worker].append(expires)
                    stop.wait(0.05)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc


def test_three_workers_once_balanced_keep_the_normal_lease_round(db_url, start_tier):
    ttl = 6  # rounds every 2 s; the short round is 0.5 s
    tier = start_tier(OUTBOX_WORKERS="3", OUTBOX_LEASE_TTL_SECONDS=str(ttl))
    shares = wait_balanced(db_url, 3, 30, interval=0.05)
    window = 6.0
    sampler = RegistrationSampler(db_url, window)
    sampler.start()
    sampler.join(window + 10)
    assert not sampler.is_alive() and sampler.error is None, sampler.error
    interval = ttl / 3
    assert set(sampler.rounds) == tier.worker_ids() == set(shares), (sampler.rounds, shares)
    gaps = {w: [round((b - a).total_seconds(), 2) for a, b in zip(r, r[1:], strict=False)]
            for w, r in sampler.rounds.items()}
    counts = {w: len(r) for w, r in sampler.rounds.items()}
    detail = f"rounds in {window} s: {counts}; gaps (s): {gaps}; shares: {shares}"
    # Every worker was seen renewing (the sampler sees rounds), and none more often than its interval.
    assert all(len(r) >= 2 for r in sampler.rounds.values()), detail
    assert all(len(r) <= window / interval + 1 for r in sampler.rounds.values()), detail
    # Half the interval: a round whose transaction started late, then one on time, is no short round.
    assert all(g >= 0.5 * interval for w in gaps for g in gaps[w]), detail
    assert tier.stop() == 0
