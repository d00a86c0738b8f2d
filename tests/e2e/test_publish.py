"""The walking skeleton, end to end: real PostgreSQL, real broker, `kaireon-pub run` as a process."""

import threading

import orjson
import psycopg
import pytest

from kaireon_pub import Event, enqueue, enqueue_many
from tests.helpers import event_ids, status_counts, wait_for
from tests.roles import TIER_ROLES


def test_committed_events_reach_the_topic_with_key_value_headers(db_url, topic, start_tier, topic_reader):
    with psycopg.connect(db_url) as conn:
        first = enqueue(conn, topic=topic, key="order-1", payload={"total": 10, "items": ["a"]},
                        headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
                        event_type="order.created")
        ids = enqueue_many(conn, [Event(topic, f"order-{i % 3}", {"n": i}, event_type="order.updated")
                                  for i in range(20)])
        conn.commit()
    tier = start_tier()
    messages = topic_reader(topic).read_count(21, timeout=60)
    by_id = {int(dict(m.headers())["event-id"]): m for m in messages}
    assert set(by_id) == {first, *ids}
    msg = by_id[first]
    headers = dict(msg.headers())
    assert msg.key() == b"order-1"
    assert orjson.loads(msg.value()) == {"total": 10, "items": ["a"]}
    assert headers["event-type"] == b"order.created"
    assert headers["traceparent"] == b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert headers["created-at"].startswith(b"20")
    wait_for(lambda: status_counts(db_url) == {"published": 21}, 30, "all rows published")
    # Per key, the topic order is the commit order.
    for key in (b"order-0", b"order-1", b"order-2"):
        seen = [int(dict(m.headers())["event-id"]) for m in messages if m.key() == key]
        assert seen == sorted(seen)
    assert tier.stop() == 0


def test_rolled_back_transaction_publishes_nothing(db_url, topic, start_tier, topic_reader):
    with psycopg.connect(db_url) as conn:
        enqueue(conn, topic=topic, key="k", payload={"rolled": "back"})
        conn.rollback()
        marker = enqueue(conn, topic=topic, key="k", payload={"committed": True})
        conn.commit()
    tier = start_tier()
    reader = topic_reader(topic)
    wait_for(lambda: status_counts(db_url) == {"published": 1}, 60, "the committed row published")
    messages = reader.read_count(1, timeout=30)
    assert event_ids(messages) == [marker]
    assert [orjson.loads(m.value()) for m in messages] == [{"committed": True}]
    assert tier.stop() == 0


@pytest.mark.parametrize("tier_role", TIER_ROLES)
def test_late_commit_with_lower_id_is_neither_skipped_nor_reordered(tier_db, topic, start_tier, topic_reader):
    """Sequence order is not commit order: a transaction holding a lower id commits last. As the
    superuser and as the runtime role (which cannot see when the application's transaction began)."""
    db_url = tier_db.url
    tier = start_tier(db_url=tier_db.tier_url)
    reader = topic_reader(topic)
    slow = psycopg.connect(tier_db.app_url)
    low = enqueue(slow, topic=topic, key="acct-1", payload={"step": 1})
    with psycopg.connect(tier_db.app_url) as fast:
        high = enqueue(fast, topic=topic, key="acct-2", payload={"step": 2})
        fast.commit()
    # Keep the slow transaction open across several poll ticks (200 ms each) before it commits.
    done = threading.Event()
    done.wait(1.0)
    slow.commit()
    slow.close()
    messages = reader.read_count(2, timeout=60)
    assert sorted(event_ids(messages)) == sorted([low, high])
    wait_for(lambda: status_counts(db_url) == {"published": 2}, 30, "both rows published")
    assert tier.stop() == 0


@pytest.mark.parametrize("tier_role", TIER_ROLES)
def test_the_horizon_waits_for_application_writers_not_for_publisher_workers(tier_db, start_tier):
    """An open writing transaction of the application holds later events back (it may still
    insert one with a lower xid); one of a publisher worker's sessions does not (it never inserts).
    As the superuser and as the runtime role: the worker-like session is then of the tier's role,
    the application's of its own role (the owner, which may register workers too)."""
    db_url = tier_db.url
    tier = start_tier(db_url=tier_db.tier_url)

    def status_of(event_id: int) -> str:
        with psycopg.connect(db_url, autocommit=True) as conn:
            return conn.execute("SELECT status FROM outbox_events WHERE id = %s", (event_id,)).fetchone()[0]

    def commit_one(key: str) -> int:
        with psycopg.connect(tier_db.app_url) as conn:
            event_id = enqueue(conn, topic="horizon-test", key=key, payload={"k": key})
            conn.commit()
        return event_id

    with psycopg.connect(tier_db.tier_url, application_name="kaireon-pub:worker-test") as worker_like:
        worker_like.execute("SELECT pg_current_xact_id()")  # an open transaction with an xid
        passes = commit_one("after-a-worker-transaction")
        wait_for(lambda: status_of(passes) == "published", 30, "published past a worker's open transaction")
        worker_like.rollback()

    with psycopg.connect(tier_db.app_url, application_name="some-app") as app_writer:
        app_writer.execute("SELECT pg_current_xact_id()")
        held = commit_one("after-an-application-transaction")
        # Several poll ticks (200 ms each) pass; the event must still be waiting.
        threading.Event().wait(1.5)
        assert status_of(held) == "pending"
        app_writer.rollback()
    wait_for(lambda: status_of(held) == "published", 30, "published once the application transaction ended")
    assert tier.stop() == 0
