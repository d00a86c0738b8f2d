"""Failure modes of issue 2: a poison event, a broker outage, a broker restart, the exit-3 streak."""

import threading

import psycopg

from kaireon_pub import Event, enqueue, enqueue_many
from tests.helpers import assert_per_key_order, event_ids, status_counts, wait_for


def test_poison_events_fail_alone_while_the_others_publish(db_url, topic, start_tier, topic_reader):
    with psycopg.connect(db_url) as conn:
        before = enqueue_many(conn, [Event(topic, f"k{i}", {"i": i}) for i in range(5)])
        # Accepted by enqueue (its limit raised here) but beyond the producer's message.max.bytes.
        poison = enqueue(conn, topic=topic, key="k-big", payload={"blob": "x" * 1_500_000},
                         max_payload_bytes=5_000_000)
        # A topic name the broker refuses: the event's own fault, not the tier's.
        bad_topic = enqueue(conn, topic="not a valid topic!", key="k-bad", payload={"x": 1})
        after = enqueue_many(conn, [Event(topic, f"k{i}", {"i": i}) for i in range(5)])
        conn.commit()
    tier = start_tier()
    messages = topic_reader(topic).read_count(10, timeout=60)
    assert sorted(event_ids(messages)) == sorted(before + after)
    wait_for(lambda: status_counts(db_url) == {"published": 10, "failed": 2}, 30, "10 published, 2 failed")
    with psycopg.connect(db_url) as conn:
        status, attempts, error = conn.execute(
            "SELECT status, attempts, last_error FROM outbox_events WHERE id = %s", (poison,)).fetchone()
    assert status == "failed" and attempts == 1
    assert "MSG_SIZE_TOO_LARGE" in error
    with psycopg.connect(db_url) as conn:
        status, error = conn.execute("SELECT status, last_error FROM outbox_events WHERE id = %s",
                                     (bad_topic,)).fetchone()
    assert status == "failed" and "TOPIC_EXCEPTION" in error
    assert not [line for line in tier.logs() if line.get("msg") == "outbox-publisher tick failed"]
    assert any(line.get("event") == "event failed" and line.get("eventId") == poison for line in tier.logs())
    # The streak was not touched: the tier is still running.
    assert tier.proc.poll() is None
    assert tier.stop() == 0


def _publish_through_outage(db_url, broker, topic, start_tier, topic_reader, outage_s: float):
    # Small batches: the outage releases many batches, whose later events must wait for them.
    tier = start_tier(bootstrap=broker.bootstrap, KAFKA_MESSAGE_TIMEOUT_MS="3000", OUTBOX_BATCH_SIZE="5",
                      OUTBOX_WORKER_TIMEOUT_SECONDS="10", OUTBOX_REAPER_STALENESS_SECONDS="60")
    with psycopg.connect(db_url) as conn:
        enqueue_many(conn, [Event(topic, f"k{i % 7}", {"phase": "before", "i": i}) for i in range(50)])
        conn.commit()
    wait_for(lambda: status_counts(db_url) == {"published": 50}, 60, "the first 50 published")
    broker.stop()
    with psycopg.connect(db_url) as conn:
        during = enqueue_many(conn, [Event(topic, f"k{i % 7}", {"phase": "during", "i": i}) for i in range(50)])
        conn.commit()
    threading.Event().wait(outage_s)  # the outage itself
    broker.start()
    # The broker came back empty: only what was published after the restart is on the topic.
    reader = topic_reader(topic, bootstrap=broker.bootstrap)
    messages = reader.read_until(lambda msgs: set(during) <= set(event_ids(msgs)), timeout=90)
    wait_for(lambda: status_counts(db_url) == {"published": 100}, 60, "all 100 rows published")
    # Released events are published again before any later event of their key.
    assert_per_key_order(messages)
    return tier, messages


def test_broker_down_for_10s_then_back_publishes_everything(db_url, restartable_broker, topic, start_tier,
                                                             topic_reader):
    tier, _ = _publish_through_outage(db_url, restartable_broker, topic, start_tier, topic_reader, outage_s=10)
    failures = [line for line in tier.logs() if line.get("msg") == "outbox-publisher tick failed"]
    assert failures and all(line["isTransient"] is True for line in failures)
    retry_ids = {line["errorId"] for line in tier.logs() if line.get("event") == "tick retry"}
    assert {line["errorId"] for line in failures} <= retry_ids  # the next-attempt line repeats the id
    assert tier.stop() == 0


def test_broker_restarted_empty_recreates_the_producer(db_url, restartable_broker, topic, start_tier, topic_reader):
    tier, _ = _publish_through_outage(db_url, restartable_broker, topic, start_tier, topic_reader, outage_s=1)
    # The broker came back empty (Tansu's memory storage; in the Kafka pass, a node whose storage was
    # formatted again) and lost the idempotent producer's state: librdkafka raised a fatal error or
    # timed out; either way nothing was lost. When it was fatal, the producer was recreated.
    if any(line.get("fatal") for line in tier.logs() if line.get("event") == "kafka error"):
        assert any(line.get("event") == "producer recreated" for line in tier.logs())
    assert tier.stop() == 0


def test_persistent_non_transient_failure_exits_3_after_30_ticks(pg, start_tier):
    # A database without the schema: every tick fails with "relation does not exist".
    url = pg.create_database("kaireon_no_schema")
    try:
        tier = start_tier(db_url=url, OUTBOX_POLL_INTERVAL_MS="50")
        assert tier.wait_exit(120) == 3
        failures = [line for line in tier.logs() if line.get("msg") == "outbox-publisher tick failed"]
        assert len(failures) == 30
        assert all(line["isTransient"] is False and line["errorId"] for line in failures)
        assert len({line["errorId"] for line in failures}) == 30
        assert any(line.get("event") == "giving up" for line in tier.logs())
    finally:
        pg.drop_database("kaireon_no_schema")
