"""The partitioned outbox end to end: `kaireon-pub run` on a partitioned outbox_events, real broker.

A drain whose keys have events on both sides of a partition boundary keeps per-key order and
loses nothing; worker 0 drops the partition that is fully published and keeps, however old, the
one holding a pending row.
"""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from kaireon_pub import Event, enqueue_many
from kaireon_pub.db import partitions as parts
from tests.helpers import (
    assert_per_key_order,
    event_ids,
    metric_value,
    wait_for,
)

pytestmark = pytest.mark.broker_agnostic("the partitioned table's claim and retention are the database's")


def test_drain_across_a_partition_boundary_keeps_key_order_and_retention_drops_only_what_may_go(
        pdb_url, topic, start_tier, topic_reader):
    with psycopg.connect(pdb_url, autocommit=True) as conn:
        floor = parts.floor(conn.execute("SELECT clock_timestamp()").fetchone()[0], "hourly")
        previous = floor - timedelta(hours=1)
        prev_name = parts.partition_name(previous, "hourly")
        conn.execute(parts._q(parts.P.create_partition, partition=prev_name))
        conn.execute(parts._q(parts.P.attach_partition, partition=prev_name, lower=previous, upper=floor))
        # An old partition with a single pending row that is never due: kept however old.
        conn.execute(parts._q(parts.P.create_partition, partition="outbox_events_p2020010100"))
        conn.execute("ALTER TABLE outbox_events ATTACH PARTITION outbox_events_p2020010100 "
                     "FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-01 01:00+00')")
        stuck = conn.execute("INSERT INTO outbox_events (topic, partition_key, payload, created_at, next_attempt_at) "
                             "VALUES (%s, 'stuck', '{}', '2020-01-01 00:10+00', 'infinity') RETURNING id",
                             (topic,)).fetchone()[0]
    # Transactions alternate between the two sides of the boundary; every key has events on both.
    committed = []
    with psycopg.connect(pdb_url) as conn:
        for tx in range(40):
            ids = enqueue_many(conn, [Event(topic, f"key-{i % 7}", {"tx": tx, "i": i}) for i in range(25)])
            if tx % 2 == 0:  # written as if a moment before the hour (an insert that ran at 10:59:59.999)
                conn.execute("UPDATE outbox_events SET created_at = %s WHERE id = ANY(%s)",
                             (floor - timedelta(milliseconds=1), ids))
            conn.commit()
            committed += ids
    with psycopg.connect(pdb_url, autocommit=True) as conn:
        where = dict(conn.execute("SELECT tableoid::regclass::text, count(*) FROM outbox_events "
                                  "WHERE id <> %s GROUP BY 1", (stuck,)).fetchall())
    assert where == {prev_name: 500, parts.partition_name(floor, "hourly"): 500}

    tier = start_tier(db_url=pdb_url, OUTBOX_WORKERS="2", OUTBOX_RETENTION_SECONDS="1",
                      OUTBOX_PURGE_INTERVAL_SECONDS="1")
    messages = topic_reader(topic).read_until(lambda ms: set(committed) <= set(event_ids(ms)), timeout=90)
    assert set(event_ids(messages)) >= set(committed)  # no event lost
    assert stuck not in event_ids(messages)
    assert_per_key_order(messages)

    def names() -> list[str]:
        with psycopg.connect(pdb_url, autocommit=True) as conn:
            return [p.name for p in parts.list_partitions(conn)]

    wait_for(lambda: prev_name not in names(), 60, "the fully published partition dropped by worker 0")
    tier.wait_log(lambda e: e.get("event") == "partition maintenance" and prev_name in e["partitionsDropped"], 10,
                  "the drop logged")
    assert [e["msg"] for e in tier.logs() if e.get("event") == "partition maintenance failed"] == []
    port = tier.http_port()
    wait_for(lambda: (metric_value(port, "kaireon_outbox_partitions_dropped_total") or 0) >= 1, 30,
             "the drop counted")
    assert "outbox_events_p2020010100" in names()  # one pending row: kept, whatever its age
    assert metric_value(port, "kaireon_outbox_oldest_partition_age_seconds") > 86400 * 365
    with psycopg.connect(pdb_url, autocommit=True) as conn:
        left = dict(conn.execute("SELECT status, count(*) FROM outbox_events GROUP BY 1").fetchall())
        assert left == {"published": 500, "pending": 1}  # the current partition's rows, and the stuck one
    assert tier.stop() == 0
