"""The application side: enqueue in the caller's transaction; bad payloads fail before writing."""

import asyncio
import gc

import orjson
import psycopg
import pytest

from kaireon_pub import ConfigError, Event, PayloadError, PendingWrite, enqueue, enqueue_many


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


# ---- keys ----------------------------------------------------------------------------------------

def test_an_int_key_is_stored_as_its_decimal_text_and_is_the_same_key_as_that_text(db_url, db):
    customer_id = 42
    with psycopg.connect(db_url, autocommit=True) as conn:
        one = enqueue(conn, topic="t", key=customer_id, payload={"n": 1})
        many = enqueue_many(conn, [Event("t", -7, {"n": 2}), Event("t", 10**20, {"n": 3}), Event("t", "42", {"n": 4})])
    rows = dict(db.execute("SELECT id, partition_key FROM outbox_events").fetchall())
    assert [rows[i] for i in (one, *many)] == ["42", "-7", "100000000000000000000", "42"]
    shards = db.execute("SELECT DISTINCT shard FROM outbox_events WHERE partition_key = '42'").fetchall()
    assert len(shards) == 1


@pytest.mark.parametrize("key", [True, 4.2, b"k", ("a",)])
def test_a_key_of_another_type_is_refused_naming_the_topic(db_url, db, key):
    with psycopg.connect(db_url) as conn:
        with pytest.raises(PayloadError, match=r"key for topic 'orders\.v1' must be a str, an int or None"):
            enqueue(conn, topic="orders.v1", key=key, payload={})
        with pytest.raises(PayloadError, match="orders.v1"):
            enqueue_many(conn, [Event("orders.v1", key, {})])
    assert count(db) == 0


@pytest.mark.parametrize("field", ["key", "topic", "event_type", "header name", "header value"])
def test_a_nul_in_a_text_field_is_a_payload_error_and_the_transaction_stays_usable(db_url, db, field):
    event = {"topic": "orders.v1", "key": "k", "payload": {}, "headers": {}, "event_type": None}
    if field == "header name":
        event["headers"] = {"trace\x00parent": "x"}
    elif field == "header value":
        event["headers"] = {"traceparent": "x\x00y"}
    else:
        event[field] = f"{field}\x00tail"
    with psycopg.connect(db_url) as conn:
        with pytest.raises(PayloadError, match="NUL"):
            enqueue(conn, **event)
        with pytest.raises(PayloadError, match="NUL"):
            enqueue_many(conn, [Event(**event)])
        enqueue(conn, topic="orders.v1", key="k", payload={"ok": True})
        conn.commit()
    assert count(db) == 1


# ---- \u0000: the NUL character versus the text backslash-u0000 -------------------------------

LITERAL = "C:\\u0000\\dir"  # a backslash, then u0000: ordinary text


@pytest.mark.parametrize("payload", [
    {"path": LITERAL},
    {LITERAL: 1},
    [LITERAL, "\\\\u0000"],  # also two backslashes before u0000
    '{"path": "C:\\\\u0000\\\\dir"}',  # the same as JSON text
])
def test_the_text_backslash_u0000_is_stored(db_url, db, payload):
    with psycopg.connect(db_url, autocommit=True) as conn:
        event_id = enqueue(conn, topic="t", key="k", payload=payload)
    stored = db.execute("SELECT payload FROM outbox_events WHERE id = %s", (event_id,)).fetchone()[0]
    expected = orjson.loads(payload) if isinstance(payload, str) else payload
    assert stored == expected


@pytest.mark.parametrize("payload", [
    {"s": "a\x00b"},
    {"a\x00": 1},
    '{"s": "a\\u0000b"}',  # JSON text with the \u0000 escape
    '{"s": "a\\\\\\u0000b"}',  # an escaped backslash, then the \u0000 escape
])
def test_the_nul_character_is_refused_before_the_database_sees_it(db_url, db, payload):
    with psycopg.connect(db_url) as conn:
        with pytest.raises(PayloadError, match=r"topic 't' holds a NUL character"):
            enqueue(conn, topic="t", key="k", payload=payload)
        enqueue(conn, topic="t", key="k", payload={"ok": True})
        conn.commit()
    assert count(db) == 1


def test_postgresql_jsonb_refuses_the_nul_escape_and_stores_the_escaped_backslash(db):
    # What the checks above mirror.
    assert db.execute("SELECT %s::jsonb", ('"\\\\u0000"',)).fetchone()[0] == "\\u0000"
    with pytest.raises(psycopg.errors.UntranslatableCharacter):
        db.execute("SELECT %s::jsonb", ('"\\u0000"',))


# ---- AsyncConnection: await it ---------------------------------------------------------------

def test_on_an_async_connection_nothing_is_written_until_awaited(db_url, db):
    async def main():
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            pending = enqueue(conn, topic="orders.v1", key="a", payload={"n": 1})
            assert isinstance(pending, PendingWrite)
            await conn.commit()
            assert count(db) == 0  # not awaited: not written
            with pytest.warns(RuntimeWarning, match=r"enqueue\(topic='orders.v1'\) .* never awaited, so nothing was written"):
                del pending
                gc.collect()
            event_id = await enqueue(conn, topic="orders.v1", key="a", payload={"n": 2})
            await conn.commit()
            return event_id

    event_id = asyncio.run(main())
    assert db.execute("SELECT id FROM outbox_events").fetchall() == [(event_id,)]


def test_on_an_async_connection_a_bad_event_raises_at_the_call(db_url, db):
    async def main():
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            with pytest.raises(PayloadError, match="topic 't'"):
                enqueue(conn, topic="t", key=None, payload={"x": object()})
            with pytest.raises(PayloadError):
                enqueue_many(conn, [Event("t", "k\x00", {})])
            assert await enqueue_many(conn, []) == []

    asyncio.run(main())
    assert count(db) == 0


def test_something_else_than_a_connection_is_a_clear_type_error(db_url):
    with psycopg.connect(db_url) as conn, conn.cursor() as cursor:
        with pytest.raises(TypeError, match=r"enqueue\(\) needs a psycopg Connection or AsyncConnection.*not Cursor"):
            enqueue(cursor, topic="t", key="k", payload={})
        with pytest.raises(TypeError, match=r"enqueue_many\(\) needs"):
            enqueue_many(db_url, [Event("t", "k", {})])


# ---- OUTBOX_MAX_PAYLOAD_BYTES in the application's environment -------------------------------

@pytest.mark.parametrize("value", ["abc", "", "1e6", "0", "-5", "104857601"])
def test_an_invalid_max_payload_bytes_in_the_environment_is_a_config_error(db_url, db, monkeypatch, value):
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", value)
    with psycopg.connect(db_url) as conn:
        with pytest.raises(ConfigError, match=r"^OUTBOX_MAX_PAYLOAD_BYTES: .*\(accepted: 1\.\.104857600\)"):
            enqueue(conn, topic="t", key="k", payload={})
        with pytest.raises(ConfigError, match="OUTBOX_MAX_PAYLOAD_BYTES"):
            enqueue_many(conn, [Event("t", "k", {})])
        conn.commit()
    assert count(db) == 0


def test_a_valid_max_payload_bytes_in_the_environment_is_the_limit(db_url, db, monkeypatch):
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", " 100 ")
    with psycopg.connect(db_url, autocommit=True) as conn:
        with pytest.raises(PayloadError, match=r"above the maximum of 100 \(OUTBOX_MAX_PAYLOAD_BYTES\)"):
            enqueue(conn, topic="t", key="k", payload={"x": "a" * 200})
        enqueue(conn, topic="t", key="k", payload={"x": "a" * 50})
        # An explicit limit wins over the environment.
        enqueue(conn, topic="t", key="k", payload={"x": "a" * 200}, max_payload_bytes=1000)
        with pytest.raises(ValueError, match="max_payload_bytes must be a positive int"):
            enqueue(conn, topic="t", key="k", payload={}, max_payload_bytes=0)
    assert count(db) == 2
