"""The application side: enqueue in the caller's transaction; bad payloads fail before writing."""

import asyncio

import psycopg
import pytest

from kaireon_pub import Event, PayloadError, enqueue, enqueue_many


def count(db) -> int:
    return db.execute("SELECT count(*) FROM outbox_events").fetchone()[0]


def test_enqueue_writes_in_the_callers_transaction(db_url, db):
    with psycopg.connect(db_url) as conn:
        event_id = enqueue(conn, topic="orders", key="o-1", payload={"total": 12},
                           headers={"traceparent": "00-abc-def-01"}, event_type="order.created")
        assert count(db) == 0  # not visible before the caller commits
        conn.commit()
    row = db.execute("SELECT topic, partition_key, payload, headers, event_type, status FROM outbox_events WHERE id = %s",
                     (event_id,)).fetchone()
    assert row == ("orders", "o-1", {"total": 12}, {"traceparent": "00-abc-def-01"}, "order.created", "pending")


def test_rollback_leaves_nothing(db_url, db):
    with psycopg.connect(db_url) as conn:
        enqueue(conn, topic="orders", key="o-1", payload={"a": 1})
        conn.rollback()
    assert count(db) == 0


def test_json_text_is_stored_as_given(db_url, db):
    with psycopg.connect(db_url, autocommit=True) as conn:
        event_id = enqueue(conn, topic="t", key=None, payload='{"raw": [1, 2]}')
    assert db.execute("SELECT payload FROM outbox_events WHERE id = %s", (event_id,)).fetchone()[0] == {"raw": [1, 2]}


@pytest.mark.parametrize(
    ("payload", "message"),
    [({"when": object()}, "not JSON-serialisable"), ("{not json", "not valid JSON"), ({"x": "a" * 2000}, "above the maximum")],
)
def test_bad_payload_raises_before_anything_is_written(db_url, db, payload, message):
    with psycopg.connect(db_url) as conn:
        with pytest.raises(PayloadError, match=message):
            enqueue(conn, topic="t", key="k", payload=payload, max_payload_bytes=1000)
        # The caller's transaction is still usable: nothing was sent.
        enqueue(conn, topic="t", key="k", payload={"ok": True})
        conn.commit()
    assert count(db) == 1


def test_enqueue_many_is_all_or_nothing_and_ordered(db_url, db):
    with psycopg.connect(db_url) as conn:
        with pytest.raises(PayloadError):
            enqueue_many(conn, [Event("t", "k", {"i": 1}), Event("t", "k", {"bad": {1, 2}})])
        ids = enqueue_many(conn, [Event("t", "k", {"i": i}) for i in range(50)])
        conn.commit()
    assert ids == sorted(ids) and len(ids) == 50
    payloads = [r[0]["i"] for r in db.execute("SELECT payload FROM outbox_events ORDER BY id")]
    assert payloads == list(range(50))


def test_async_connections(db_url, db):
    async def main():
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            one = await enqueue(conn, topic="t", key="a", payload={"n": 1})
            many = await enqueue_many(conn, [Event("t", "a", {"n": 2}), Event("t", "a", {"n": 3})])
            await conn.commit()
            return [one, *many]

    ids = asyncio.run(main())
    assert len(ids) == 3 and count(db) == 3


def test_same_key_same_shard(db_url, db):
    with psycopg.connect(db_url, autocommit=True) as conn:
        enqueue_many(conn, [Event("t", "customer-42", {"i": i}) for i in range(5)])
    assert db.execute("SELECT count(DISTINCT shard) FROM outbox_events").fetchone()[0] == 1
