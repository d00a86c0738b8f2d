"""Fencing: a worker stopped mid-batch past the staleness cannot overwrite the new owner's state."""

import os
import signal

import psycopg
import pytest

from kaireon_pub import Event, enqueue, enqueue_many
from tests.helpers import (
    metric_value,
    run_cli,
    status_counts,
    wait_for,
)

pytestmark = pytest.mark.broker_agnostic("fencing of a stale claim is the database's")


def test_zombie_worker_mark_changes_nothing(db_url, restartable_broker, topic, start_tier, topic_reader):
    broker = restartable_broker
    # A long message timeout keeps the zombie's messages alive across its pause, so it does
    # come back with delivery reports and tries to mark.
    slow = {"KAFKA_MESSAGE_TIMEOUT_MS": "60000", "OUTBOX_WORKER_TIMEOUT_SECONDS": "90",
            "OUTBOX_REAPER_STALENESS_SECONDS": "120"}
    tier_a = start_tier(name="a", bootstrap=broker.bootstrap, **slow)
    env_a = tier_a.env
    port_a = tier_a.http_port()
    with psycopg.connect(db_url, autocommit=True) as conn:
        enqueue(conn, topic=topic, key="warm-up", payload={})
    wait_for(lambda: status_counts(db_url) == {"published": 1}, 60, "the warm-up event published")
    zombie = tier_a.worker_pids()[0]

    # Freeze the broker so the batch stays in flight, then freeze the worker holding it.
    os.kill(broker.process.pid, signal.SIGSTOP)
    try:
        with psycopg.connect(db_url) as conn:
            ids = enqueue_many(conn, [Event(topic, f"acct-{i}", {"i": i}) for i in range(5)])
            conn.commit()
        wait_for(lambda: status_counts(db_url).get("processing") == 5, 30, "the batch claimed")
        os.kill(zombie, signal.SIGSTOP)
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            token = conn.execute(
                "SELECT DISTINCT claim_token FROM outbox_events WHERE status = 'processing'").fetchall()
            assert len(token) == 1
            # Time passes for the claim (backdated rather than slept for) and for A's lease.
            conn.execute("UPDATE outbox_events SET updated_at = clock_timestamp() - interval '200 seconds' "
                         "WHERE status = 'processing'")
        reaped = run_cli("reap", env=env_a)
        assert reaped.returncode == 0, reaped.stderr
        assert '"resetCount":5' in reaped.stdout.replace(" ", "")
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("UPDATE outbox_shard_leases SET expires_at = clock_timestamp() - interval '1 second'")
            conn.execute("UPDATE outbox_workers SET expires_at = clock_timestamp() - interval '1 second'")

        # The new owner takes the shards, re-claims and publishes.
        tier_b = start_tier(name="b", bootstrap=broker.bootstrap)
        wait_for(lambda: status_counts(db_url) == {"published": 6}, 60, "the new owner publishes")
        with psycopg.connect(db_url, autocommit=True) as conn:
            before = conn.execute("SELECT id, status, published_at FROM outbox_events WHERE id = ANY(%s) ORDER BY id",
                                  (ids,)).fetchall()
    finally:
        os.kill(zombie, signal.SIGCONT)

    # The zombie wakes with delivery reports for a claim it lost: its mark lands nowhere.
    wait_for(lambda: (metric_value(port_a, "kaireon_outbox_lease_lost_total") or 0) >= 1, 60,
             "the zombie's lease-lost counter")
    with psycopg.connect(db_url, autocommit=True) as conn:
        after = conn.execute("SELECT id, status, published_at FROM outbox_events WHERE id = ANY(%s) ORDER BY id",
                             (ids,)).fetchall()
    assert after == before
    assert all(status == "published" for _, status, _ in after)
    assert any(line.get("event") == "lease lost" for line in tier_a.logs())
    topic_reader(topic, bootstrap=broker.bootstrap).read_ids(ids, timeout=60)
    assert tier_b.stop() == 0
    assert tier_a.stop() == 0
