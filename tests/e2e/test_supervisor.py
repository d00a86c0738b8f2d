"""The supervisor tier with real processes and signals: backlog, drain, crashes, hangs, metrics."""

import os
import signal
import time

import psycopg

from tests.helpers import (
    Load,
    assert_per_key_order,
    event_ids,
    metric_value,
    preload,
    run_cli,
    status_counts,
    wait_balanced,
    wait_for,
)


def test_four_workers_publish_a_50000_event_backlog(db_url, topic, start_tier, topic_reader):
    tier = start_tier(OUTBOX_WORKERS="4")
    # The backlog arrives once the four workers share the shards (the first to start holds all
    # 256 until its next rebalance; a fast drain could otherwise be over before that).
    wait_balanced(db_url, 4, of=tier.worker_ids)
    preload(db_url, topic, 50_000)
    wait_for(lambda: status_counts(db_url) == {"published": 50_000}, 240, "50,000 rows published")
    messages = topic_reader(topic).read_until(lambda msgs: len(set(event_ids(msgs))) >= 50_000, timeout=120)
    assert len(set(event_ids(messages))) == 50_000
    assert_per_key_order(messages)
    assert tier.stop() == 0


def test_sigterm_under_load_drains_within_15_s(db_url, topic, start_tier):
    tier = start_tier(OUTBOX_WORKERS="2")
    with Load(db_url, topic) as load:
        wait_for(lambda: status_counts(db_url).get("published", 0) > 2000, 60, "publishing under load")
        committed_before = list(load.committed)
        started = time.monotonic()
        tier.proc.send_signal(signal.SIGTERM)
        code = tier.wait_exit(30)
        elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 15, f"drain took {elapsed:.1f} s"
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = dict(conn.execute("SELECT id, status FROM outbox_events WHERE id = ANY(%s)",
                                 (committed_before,)).fetchall())
    assert len(rows) == len(committed_before)
    assert set(rows.values()) <= {"published", "pending"}
    assert "processing" not in status_counts(db_url)
    assert any(line.get("event") == "drain done" for line in tier.logs())


def frozen_with_claims(db_url: str, tier, slot: int) -> tuple[int, str, int]:
    """SIGSTOP the worker of `slot` at a moment it holds claimed rows (status 'processing'): its
    pid, its worker id and how many rows it holds. Counted once none of its sessions is running a
    statement (a statement it sent just before the stop may still commit)."""
    pid = tier.worker_pids()[slot]
    worker_id = next(line["workerId"] for line in tier.logs()
                     if line.get("event") == "worker spawned" and line["workerPid"] == pid)
    with psycopg.connect(db_url, autocommit=True) as conn:
        def settled() -> bool:
            return not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                    "AND application_name LIKE %s", (f"%.{worker_id[:8]}%",)).fetchone()[0]

        def claimed() -> int:
            return conn.execute("SELECT count(*) FROM outbox_events WHERE status = 'processing' "
                                "AND claimed_by = %s", (worker_id,)).fetchone()[0]

        def stopped_holding_claims() -> int:
            os.kill(pid, signal.SIGSTOP)
            wait_for(settled, 5, "the stopped worker's statements to finish")
            held = claimed()
            if not held:
                os.kill(pid, signal.SIGCONT)
            return held
        return pid, worker_id, wait_for(stopped_holding_claims, 30, "the worker stopped holding claimed rows")


def test_sigkill_of_one_worker_is_respawned_and_nothing_is_lost(db_url, topic, start_tier, topic_reader):
    tier = start_tier(OUTBOX_WORKERS="2")
    port = tier.http_port()
    with Load(db_url, topic) as load:
        wait_for(lambda: len(tier.worker_pids()) == 2, 30, "two workers")
        wait_for(lambda: status_counts(db_url).get("published", 0) > 1000, 60, "publishing under load")
        # Killed while it holds claimed rows: the crash recovery has rows to give back.
        victim, victim_id, held = frozen_with_claims(db_url, tier, 1)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: tier.worker_pids()[1] != victim, 30, "slot 1 respawned")
        at_respawn = status_counts(db_url).get("published", 0)
        wait_for(lambda: status_counts(db_url).get("published", 0) > at_respawn + 500,
                 60, "publishing continues after the respawn")
        committed = load.stop()
    wait_for(lambda: status_counts(db_url) == {"published": len(committed)}, 60, "every committed row published")
    recovery = tier.wait_log(lambda e: e.get("event") == "crash recovery", 10, "the crash recovery line")
    # Exactly the rows the killed worker held came back: by its successor's crash recovery or, when
    # its leases lapsed first (stop, kill, respawn and boot past the 10 s TTL on a loaded machine;
    # CI: resetCount 0 of 14), by the takeover of its shards (the rebalance's resetRows).
    assert recovery["deadWorkers"] == [victim_id]
    taken_over = sum(e.get("resetRows", 0) for e in tier.logs() if e.get("event") == "rebalance")
    assert recovery["resetCount"] + taken_over == held, (recovery["resetCount"], taken_over, held)
    assert metric_value(port, "kaireon_outbox_worker_restarts_total", {"reason": "killed"}) >= 1
    topic_reader(topic).read_ids(committed, timeout=60)
    assert tier.stop() == 0


def test_sigstop_makes_liveness_stale_then_the_tier_recovers(db_url, topic, start_tier):
    tier = start_tier(OUTBOX_WORKERS="2", KAFKA_MESSAGE_TIMEOUT_MS="2000", OUTBOX_WORKER_TIMEOUT_SECONDS="4",
                      OUTBOX_REAPER_STALENESS_SECONDS="60")
    env = tier.env
    alive = env["OUTBOX_LIVENESS_FILE"]

    def liveness(max_stale: str) -> int:
        return run_cli("liveness-check", "--max-stale-seconds", max_stale, env=env).returncode

    wait_for(lambda: liveness("1.5") == 0, 30, "a fresh liveness file")
    victim = tier.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        # The supervisor stops touching the file: it goes stale, and the probe fails.
        wait_for(lambda: liveness("1.5") != 0, 15, "the liveness file to go stale")
        assert os.path.exists(alive)
        # After OUTBOX_WORKER_TIMEOUT_SECONDS the hung worker is killed and respawned.
        wait_for(lambda: tier.worker_pids()[0] != victim, 30, "the hung worker replaced")
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    wait_for(lambda: liveness("1.5") == 0, 30, "liveness fresh again")
    assert any(line.get("event") == "worker hung" for line in tier.logs())
    with Load(db_url, topic) as load:
        wait_for(lambda: len(load.committed) >= 200, 30, "some load")
        committed = load.stop()
    wait_for(lambda: status_counts(db_url) == {"published": len(committed)}, 60, "the recovered tier publishes")
    assert tier.stop() == 0


def test_metrics_show_pending_count_and_published_totals(db_url, topic, start_tier):
    with psycopg.connect(db_url, autocommit=True) as conn:
        # Seven rows waiting for a retry an hour from now: pending, and not publishable yet.
        conn.execute("""INSERT INTO outbox_events (topic, partition_key, payload, attempts, next_attempt_at)
                        SELECT %s, 'parked-' || g, '{}'::jsonb, 1, now() + interval '1 hour'
                        FROM generate_series(1, 7) g""", (topic,))
    preload(db_url, topic, 300, keys=30)
    tier = start_tier(OUTBOX_WORKERS="2")
    port = tier.http_port()
    wait_for(lambda: status_counts(db_url) == {"published": 300, "pending": 7}, 60, "300 published, 7 parked")
    wait_for(lambda: metric_value(port, "kaireon_outbox_pending_count") == 7, 30, "the pending gauge at 7")
    # Counted just after each mark commits (the gauge's pass need not come after the last count).
    wait_for(lambda: metric_value(port, "kaireon_outbox_processed_total", {"outcome": "published"}) == 300, 10,
             "300 published counted")
    wait_for(lambda: metric_value(port, "kaireon_outbox_event_age_seconds_count") == 300, 10, "300 ages observed")
    assert metric_value(port, "kaireon_outbox_last_success_timestamp_seconds") > time.time() - 60
    assert tier.stop() == 0
