"""The publish path at the edges (issue 12): producer-level faults recover, leases outlive a slow
broker, poison of any shape stays on its row, librdkafka is heard while idle.

Faults are injected from outside: a TCP proxy between the tier and the broker that blackholes,
SIGSTOP/SIGCONT of the broker, a broker restarted empty with another cluster id, rows written by
plain SQL. After every fault: nothing lost, nothing left `processing`, duplicates only where
counted, the tier still running.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from datetime import datetime

import psycopg
import pytest

from kaireon_pub import Event, enqueue_many
from tests.faults import FaultBroker
from tests.helpers import (
    assert_per_key_order,
    commit_events,
    event_ids,
    metric_value,
    row_summary,
    status_counts,
    wait_all_published,
    wait_balanced,
    wait_for,
)


@pytest.fixture
def proxied_broker():
    """A broker of the test's own; every client connection goes through `proxied_broker.proxy`."""
    b = FaultBroker(proxied=True)
    yield b
    b.close()


@pytest.fixture
def fault_broker():
    """A broker of the test's own that the test may freeze, kill or restart."""
    b = FaultBroker(cluster_id=f"kaireon-a-{uuid.uuid4().hex[:8]}")
    yield b
    b.close()


def duplicated(messages: list) -> dict[int, int]:
    return {i: n for i, n in collections.Counter(event_ids(messages)).items() if n > 1}


def ts(line: dict) -> float:
    return datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()


# ---- the harness itself ---------------------------------------------------------------------------


def test_the_proxy_passes_everything_in_pass_mode(db_url, proxied_broker, topic, start_tier, topic_reader):
    # Not a fault: proves that the tier and the reader really talk through the proxy.
    tier = start_tier(bootstrap=proxied_broker.bootstrap, OUTBOX_BATCH_SIZE="5")
    ids = commit_events(db_url, topic, 40, keys=7, phase="pass")
    wait_all_published(db_url, 40, 60, "40 published through the proxy")
    messages = topic_reader(topic, bootstrap=proxied_broker.bootstrap).read_ids(ids, 30)
    assert sorted(event_ids(messages)) == sorted(ids)
    assert_per_key_order(messages)
    proxy = proxied_broker.proxy
    assert proxy.accepted >= 2  # the tier's producer and the reader
    assert sum(c.bytes["up"] for c in proxy.connections()) > 0
    assert tier.proc.poll() is None
    assert tier.stop() == 0


def test_connections_reset_for_5s_then_everything_published_once_counted(db_url, proxied_broker, topic, start_tier,
                                                                          topic_reader):
    # The proxy's reset mode: every connection, open or new, gets an RST for 5 s.
    tier = start_tier(bootstrap=proxied_broker.bootstrap, OUTBOX_BATCH_SIZE="5")
    before = commit_events(db_url, topic, 30, keys=7, phase="before")
    wait_all_published(db_url, 30, 60, "the first 30 published")
    accepted = proxied_broker.proxy.accepted
    proxied_broker.proxy.set_mode("reset")
    during = commit_events(db_url, topic, 30, keys=7, phase="during")
    wait_for(lambda: proxied_broker.proxy.accepted > accepted, 10, "the producer reconnecting into the resets")
    threading.Event().wait(5)  # the fault itself: 5 s of resets
    proxied_broker.proxy.set_mode("pass")
    wait_all_published(db_url, 60, 45, "all 60 rows published after the resets")
    messages = topic_reader(topic, bootstrap=proxied_broker.bootstrap).read_ids(before + during, 30)
    assert_per_key_order(messages)
    assert row_summary(db_url)["withAttempts"] == 0, row_summary(db_url)
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


# ---- producer-level failures recover --------------------------------------------------------------


def test_a_20s_blackhole_with_events_in_flight_loses_and_fails_nothing(db_url, proxied_broker, topic, start_tier,
                                                                       topic_reader):
    # Default KAFKA_MESSAGE_TIMEOUT_MS (10 s): the in-flight batches outlive it inside the blackhole.
    tier = start_tier(bootstrap=proxied_broker.bootstrap, OUTBOX_BATCH_SIZE="5")
    before = commit_events(db_url, topic, 30, keys=7, phase="before")
    wait_all_published(db_url, 30, 60, "the first 30 published")
    proxied_broker.proxy.set_mode("blackhole")
    during = commit_events(db_url, topic, 50, keys=7, phase="during")
    wait_for(lambda: status_counts(db_url).get("processing"), 10, "a batch in flight inside the blackhole")
    threading.Event().wait(20)  # the fault itself: a 20 s blackhole
    proxied_broker.proxy.set_mode("pass")
    after = commit_events(db_url, topic, 20, keys=7, phase="after")
    wait_all_published(db_url, 100, 45, "all 100 rows published after the blackhole")
    messages = topic_reader(topic, bootstrap=proxied_broker.bootstrap).read_ids(before + during + after, 30)
    assert_per_key_order(messages)
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


def test_a_broker_paused_beyond_the_message_timeout_loses_and_fails_nothing(db_url, fault_broker, topic, start_tier,
                                                                            topic_reader):
    # Paused for twice the message timeout. (Tansu answers PRODUCER_FENCED afterwards with a 10 s
    # timeout and a 20 s pause; with a 3 s timeout and an 8, 12 or 20 s pause it did not.)
    tier = start_tier(bootstrap=fault_broker.bootstrap, KAFKA_MESSAGE_TIMEOUT_MS="10000", OUTBOX_BATCH_SIZE="5")
    before = commit_events(db_url, topic, 30, keys=7, phase="before")
    wait_all_published(db_url, 30, 60, "the first 30 published")
    fault_broker.pause()
    paused_at = time.monotonic()
    during = commit_events(db_url, topic, 30, keys=7, phase="during")
    wait_for(lambda: status_counts(db_url).get("processing"), 5, "a batch in flight while the broker is paused")
    threading.Event().wait(max(0.0, 20 - (time.monotonic() - paused_at)))  # the fault itself: a 20 s pause
    fault_broker.resume()
    after = commit_events(db_url, topic, 20, keys=7, phase="after")
    wait_all_published(db_url, 80, 45, "all 80 rows published after the pause")
    messages = topic_reader(topic, bootstrap=fault_broker.bootstrap).read_ids(before + during + after, 30)
    assert_per_key_order(messages)
    # Nothing of this was the events' fault: no per-event retry was counted against them.
    assert row_summary(db_url)["withAttempts"] == 0, row_summary(db_url)
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


def test_a_broker_restarted_empty_with_another_cluster_id_is_published_to_by_every_worker(
        db_url, fault_broker, topic, start_tier, topic_reader):
    tier = start_tier(bootstrap=fault_broker.bootstrap, OUTBOX_WORKERS="2", OUTBOX_BATCH_SIZE="20")
    port = tier.http_port()
    wait_balanced(db_url, 2)
    # 100 keys: both workers' shards have events, so both producers are connected to the old cluster.
    commit_events(db_url, topic, 100, keys=100, phase="before")
    wait_all_published(db_url, 100, 60, "the first 100 published")
    lines_before = len(tier.logs())
    fault_broker.restart(cluster_id=f"kaireon-b-{uuid.uuid4().hex[:8]}")
    after = commit_events(db_url, topic, 100, keys=100, phase="after")
    wait_all_published(db_url, 200, 50, "all 200 rows published after the broker was replaced")
    # The new cluster is empty: what is on it now was published after the switch.
    messages = topic_reader(topic, bootstrap=fault_broker.bootstrap).read_ids(after, 30)
    assert set(event_ids(messages)) == set(after)
    assert_per_key_order(messages)
    noticed = {line.get("role") for line in tier.logs()[lines_before:]
               if line.get("event") in ("cluster changed", "producer recreated")}
    assert {"worker-0", "worker-1"} <= noticed, f"workers that noticed the new cluster: {sorted(noticed - {None})}"
    recreated = [line for line in tier.logs() if line.get("event") == "producer recreated"]
    assert all(line.get("reason") and line.get("errorId") for line in recreated), recreated[:3]
    assert (metric_value(port, "kaireon_outbox_producer_recreated_total") or 0) >= len(recreated)
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


# ---- leases outlive a slow broker ------------------------------------------------------------------


def test_a_15s_frozen_broker_within_the_message_timeout_causes_no_takeover_and_no_duplicate(
        db_url, fault_broker, topic, start_tier, topic_reader):
    # A 20 s message timeout (valid), a lease TTL far shorter than the freeze: the busy worker's
    # leases must be kept while its batch waits on the broker, so the idle peer takes nothing.
    tier = start_tier(bootstrap=fault_broker.bootstrap, OUTBOX_WORKERS="2", KAFKA_MESSAGE_TIMEOUT_MS="20000",
                      OUTBOX_WORKER_TIMEOUT_SECONDS="25", OUTBOX_REAPER_STALENESS_SECONDS="120",
                      OUTBOX_LEASE_TTL_SECONDS="6")
    try:
        wait_balanced(db_url, 2)
    except AssertionError:
        raise AssertionError(f"the tier did not start (exit {tier.proc.poll()}): "
                             f"{[line for line in tier.logs() if line.get('level') == 'ERROR'][:2]}") from None
    # One key, so one shard: one worker is busy with it, the other is idle.
    warm = commit_events(db_url, topic, 1, keys=1, phase="warm-up", key_prefix="only-key-")
    wait_all_published(db_url, 1, 30, "the warm-up event published")
    fault_broker.pause()
    paused_at = time.monotonic()
    frozen = commit_events(db_url, topic, 10, keys=1, phase="frozen", key_prefix="only-key-")
    wait_for(lambda: status_counts(db_url).get("processing") == 10, 5,
             "the 10 events claimed while the broker is frozen")
    threading.Event().wait(max(0.0, 15 - (time.monotonic() - paused_at)))  # the fault itself: a 15 s freeze
    fault_broker.resume()
    wait_all_published(db_url, 11, 30, "the 11 rows published after the freeze")
    messages = topic_reader(topic, bootstrap=fault_broker.bootstrap).read_ids(warm + frozen, 30, extra=3)
    assert duplicated(messages) == {}, f"event ids on the topic more than once: {duplicated(messages)}"
    assert_per_key_order(messages)
    expired = [line for line in tier.logs() if line.get("event") == "lease expired"]
    assert expired == [], expired[:2]
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


# ---- poison of any shape stays on its row -----------------------------------------------------------


def test_a_row_with_array_headers_fails_alone_and_the_others_publish_once(db_url, topic, start_tier, topic_reader):
    with psycopg.connect(db_url) as conn:
        # Written the way an old restore would: around the CHECK that the migration adds.
        conn.execute("ALTER TABLE outbox_events DROP CONSTRAINT IF EXISTS outbox_events_headers_is_object")
        first = enqueue_many(conn, [Event(topic, f"k{i}", {"i": i}) for i in range(10)])
        poison = conn.execute(
            "INSERT INTO outbox_events (topic, partition_key, payload, headers) "
            "VALUES (%s, 'k-poison', '{\"x\": 1}', '[1,2]') RETURNING id", (topic,)).fetchone()[0]
        then = enqueue_many(conn, [Event(topic, f"k{i}", {"i": i}) for i in range(10, 20)])
        conn.commit()
    tier = start_tier()
    others = first + then
    try:
        wait_for(lambda: status_counts(db_url) == {"published": 20, "failed": 1}, 30, "20 published, 1 failed",
                 interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; rows: {row_summary(db_url)}") from None
    with psycopg.connect(db_url, autocommit=True) as conn:
        status, error = conn.execute("SELECT status, last_error FROM outbox_events WHERE id = %s", (poison,)).fetchone()
    assert status == "failed"
    assert error and "header" in error.lower(), error
    messages = topic_reader(topic).read_ids(others, 30, extra=3)
    assert sorted(event_ids(messages)) == sorted(others), f"duplicates: {duplicated(messages)}"
    failures = [line for line in tier.logs() if line.get("msg") == "outbox-publisher tick failed"]
    assert failures == [], failures[:2]
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


def test_a_nested_header_value_arrives_as_its_json_text(db_url, topic, start_tier, topic_reader):
    with psycopg.connect(db_url) as conn:
        event_id = conn.execute(
            "INSERT INTO outbox_events (topic, partition_key, payload, headers) "
            "VALUES (%s, 'k-nested', '{\"x\": 1}', '{\"meta\": {\"n\": 1}, \"s\": \"x\"}') RETURNING id",
            (topic,)).fetchone()[0]
        conn.commit()
    tier = start_tier()
    [message] = topic_reader(topic).read_ids([event_id], 30)
    headers = dict(message.headers())
    assert headers["meta"] == b'{"n":1}'
    assert headers["s"] == b"x"
    assert headers["event-id"] == str(event_id).encode()
    wait_all_published(db_url, 1, 10, "the row marked published")
    assert tier.stop() == 0


# ---- librdkafka is heard while idle -----------------------------------------------------------------


def test_a_broker_error_while_idle_is_logged_within_2s(db_url, proxied_broker, start_tier):
    # Through the proxy only to see the producer's connection; the fault is the broker's death.
    tier = start_tier(bootstrap=proxied_broker.bootstrap)
    tier.wait_log(lambda line: line.get("event") == "worker started", 30, "the worker started")
    # Idle, no events: the producer has made its bootstrap connection.
    wait_for(lambda: proxied_broker.proxy.connections(), 10, "the producer connected to the broker", interval=0.1)
    killed_at = time.time()
    proxied_broker.kill()

    def heard() -> dict | None:
        return next((line for line in tier.logs()
                     if (line.get("logger") == "kaireon_pub.librdkafka" or line.get("event") == "kafka error")
                     and ts(line) >= killed_at - 0.01), None)

    try:
        line = wait_for(heard, 5, "a librdkafka line after the broker was killed", interval=0.1)
    except AssertionError as exc:
        tier.stop()
        late = heard()
        raise AssertionError(f"{exc}; the first one came at shutdown, {ts(late) - killed_at:.1f} s after the kill: "
                             f"{late}" if late else f"{exc}; none even at shutdown") from None
    assert ts(line) - killed_at <= 2.0, line
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0
