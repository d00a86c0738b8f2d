"""A partition_key too long for the claim's btree indexes (over ~2,700 bytes) must not stop every
other key of its worker: migration 0009 refuses a key over 1024 bytes at the INSERT (a named CHECK),
enqueue() refuses it before writing, and a row written before 0009 is named by `kaireon-pub check`
and moved out of the table as the README says (README, "In the table, and from SQL")."""

from __future__ import annotations

import json
import os
import uuid

import psycopg
import psycopg.errors
import pytest

from kaireon_pub import Event, enqueue, enqueue_many
from kaireon_pub.db.migrate import available, migrate
from kaireon_pub.errors import PayloadError
from tests import helpers

LONG = os.urandom(1500).hex()  # 3,000 bytes of text: over the btree row limit of the claim's indexes
OTHERS = 20  # normal events, 10 keys; one worker owns every shard (OUTBOX_WORKERS=1)


def commit_others(url: str, topic: str) -> list[int]:
    with psycopg.connect(url) as conn:
        ids = enqueue_many(conn, [Event(topic, f"k{i % 10}", {"i": i}) for i in range(OTHERS)])
        conn.commit()
    return ids


def test_a_long_key_is_refused_at_the_insert_and_every_other_event_is_published(db_url, topic, start_tier,
                                                                                topic_reader):
    start_tier()
    with psycopg.connect(db_url, autocommit=True) as conn:
        # An application writing the outbox with plain SQL.
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            conn.execute("INSERT INTO outbox_events (topic, partition_key, payload) VALUES (%s, %s, '{}')",
                         (topic, LONG))
        assert refused.value.diag.constraint_name == "outbox_events_partition_key_length"
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            conn.execute("INSERT INTO outbox_events (topic, partition_key, partition_key_bytes, payload) "
                         "VALUES (%s, 'k', %s, '{}')", (topic, os.urandom(1025)))
        assert refused.value.diag.constraint_name == "outbox_events_partition_key_bytes_length"
        with pytest.raises(PayloadError, match="above the maximum of 1024 bytes"):
            enqueue(conn, topic=topic, key=LONG, payload={})
        at_limit = enqueue(conn, topic=topic, key="x" * 1024, payload={})
    ids = commit_others(db_url, topic) + [at_limit]
    reader = topic_reader(topic)
    messages = reader.read_ids(ids, timeout=60)
    assert sorted(helpers.event_ids(messages)) == sorted(ids)
    helpers.wait_all_published(db_url, len(ids), 30, "every event published")


@pytest.mark.parametrize("flavour", ["plain", "partitioned"])
def test_a_long_key_written_before_0009_is_named_by_check_and_moved_out_as_the_readme_says(
        pg, broker, topic, start_tier, topic_reader, tmp_path, flavour):
    name = f"kaireon_l_{uuid.uuid4().hex[:10]}"
    url = pg.create_database(name)
    try:
        partitioning = "hourly" if flavour == "partitioned" else "none"
        with psycopg.connect(url, autocommit=True) as conn:
            before = [m for m in available(flavour) if m.version < 9]
            migrate(conn, migrations=before, partitioning=partitioning)
            [(poison,)] = conn.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
                                       "VALUES (%s, %s, '{}') RETURNING id", (topic, LONG)).fetchall()
            # 0009 on a table that holds such a row: NOT VALID reads none and fails on none.
            assert [m.version for m in migrate(conn, partitioning=partitioning)] == [9]
        ids = commit_others(url, topic)

        env = helpers.tier_env(url, broker.bootstrap, tmp_path)
        done = helpers.run_cli("check", "--json", env=env)
        checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
        assert checks["keys"]["status"] == "warn", checks
        assert f"id {poison} (topic {topic!r}" in checks["keys"]["detail"]
        assert "key 3000 bytes" in checks["keys"]["detail"]
        if flavour == "partitioned":
            return  # the claim's failure and the fix are the same SQL on both flavours

        # The stall: the claim's UPDATE of the old row fails on the CHECK (before 0009: on the index
        # row size), for the whole batch, every tick, retried as before (not a worker exit).
        tier = start_tier(db_url=url)
        failed = tier.wait_log(lambda e: e.get("event") == "tick failed"
                               and "outbox_events_partition_key_length" in e.get("error", ""), 60,
                               "the claim failing on the long key, naming the constraint")
        assert failed["isTransient"] is True
        assert helpers.status_counts(url) == {"pending": OTHERS + 1}
        with psycopg.connect(url, autocommit=True) as conn:  # README, "In the table, and from SQL"
            conn.execute("CREATE TABLE outbox_long_keys AS SELECT * FROM outbox_events "
                         "WHERE status = 'pending' AND octet_length(partition_key) > 1024")
            conn.execute("DELETE FROM outbox_events WHERE id IN (SELECT id FROM outbox_long_keys)")
            assert conn.execute("SELECT array_agg(id) FROM outbox_long_keys").fetchone()[0] == [poison]
        helpers.wait_all_published(url, OTHERS, 60, "every other event published once the long key is moved out")
        assert sorted(helpers.event_ids(topic_reader(topic).read_ids(ids, timeout=30))) == ids
        done = helpers.run_cli("check", "--json", env=env)
        assert {c["name"]: c for c in json.loads(done.stdout)["checks"]}["keys"]["status"] == "ok"
    finally:
        pg.drop_database(name)
