"""The opt-in lock claim mode, delete-on-publish, and the retention purge, end to end."""

import psycopg

from tests.helpers import (
    assert_per_key_order,
    event_ids,
    metric_value,
    preload,
    status_counts,
    wait_for,
)


def test_lock_mode_publishes_in_order_with_one_write_per_event(db_url, topic, start_tier, topic_reader):
    preload(db_url, topic, 3000, keys=50)
    tier = start_tier(OUTBOX_WORKERS="2", OUTBOX_CLAIM_MODE="lock")
    wait_for(lambda: status_counts(db_url) == {"published": 3000}, 120, "3000 published in lock mode")
    messages = topic_reader(topic).read_until(lambda msgs: len(set(event_ids(msgs))) >= 3000, timeout=60)
    assert_per_key_order(messages)
    assert tier.stop() == 0


def test_delete_on_publish_and_retention_purge(db_url, topic, start_tier, topic_reader):
    with psycopg.connect(db_url, autocommit=True) as conn:
        # Old published rows, past a 60 s retention.
        conn.execute("""INSERT INTO outbox_events (topic, partition_key, payload, status, published_at)
                        SELECT %s, 'old-' || g, '{}'::jsonb, 'published', now() - interval '2 hours'
                        FROM generate_series(1, 120) g""", (topic,))
    preload(db_url, topic, 500, keys=20)
    tier = start_tier(OUTBOX_DELETE_ON_PUBLISH="true", OUTBOX_RETENTION_SECONDS="60", OUTBOX_PURGE_BATCH_SIZE="50",
                      OUTBOX_PURGE_INTERVAL_SECONDS="1")
    port = tier.http_port()
    wait_for(lambda: status_counts(db_url) == {}, 60, "every row delivered and deleted, old rows purged")
    # The counters move just after the last DELETE commits: waited for, and exact (no double count).
    wait_for(lambda: metric_value(port, "kaireon_outbox_purged_total") == 120, 10, "120 purged counted")
    wait_for(lambda: metric_value(port, "kaireon_outbox_processed_total", {"outcome": "published"}) == 500, 10,
             "500 published counted")
    topic_reader(topic).read_until(lambda msgs: len(set(event_ids(msgs))) >= 500, timeout=60)
    assert tier.stop() == 0
