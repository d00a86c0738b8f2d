"""The application side: enqueue in the caller's transaction; bad payloads fail before writing."""

import asyncio
import gc

import orjson
import psycopg
import pytest

from kaireon_pub import ConfigError, Event, PayloadError, PendingWrite, enqueue, enqueue_many


def count(db) -> int:
    return db.execute("SELECT count(*) FROM outbox_events").fetchone()[0]


def stored(db, event_id: int) -> tuple:
    """(payload jsonb, payload_bytes, partition_key, partition_key_bytes, headers, binary_headers)."""
    return db.execute("SELECT payload, payload_bytes, partition_key, partition_key_bytes, headers, binary_headers "
                      "FROM outbox_events WHERE id = %s", (event_id,)).fetchone()


def test_enqueue_writes_in_the_callers_transaction(db_url, db):
    with psycopg.connect(db_url) as conn:
        event_id = enqueue(conn, topic="orders", key="o-1", payload={"total": 12},
                           headers={"traceparent": "00-abc-def-01"}, event_type="order.created")
        assert count(db) == 0  # not visible before the caller commits
        conn.commit()
    row = db.execute("SELECT topic, partition_key, payload_bytes, headers, event_type, status FROM outbox_events "
                     "WHERE id = %s", (event_id,)).fetchone()
    assert row == ("orders", "o-1", b'{"total":12}', {"traceparent": "00-abc-def-01"}, "order.created", "pending")


def test_rollback_leaves_nothing(db_url, db):
    with psycopg.connect(db_url) as conn:
        enqueue(conn, topic="orders", key="o-1", payload={"a": 1})
        conn.rollback()
    assert count(db) == 0


# ---- payloads: the bytes given, kept ---------------------------------------------------------

ALL_BYTES = bytes(range(256))


@pytest.mark.parametrize(("payload", "expected"), [
    ({"b": 1, "a": [2, 1]}, b'{"b":1,"a":[2,1]}'),  # orjson.dumps: the dict's own key order
    ('{"b": 1,  "a":\t[2 , 1] }\n', b'{"b": 1,  "a":\t[2 , 1] }\n'),  # a str: its UTF-8, whitespace and all
    ('{"a": 1, "a": 2}', b'{"a": 1, "a": 2}'),  # jsonb would keep one of the two
    ("plain text, not JSON: \u00e9", "plain text, not JSON: \u00e9".encode()),
    (ALL_BYTES, ALL_BYTES),
    (bytearray(b"\x00\x01"), b"\x00\x01"),
    (memoryview(b"\x00\x02"), b"\x00\x02"),
    ({"s": "a\x00b"}, b'{"s":"a\\u0000b"}'),  # a NUL in a string: bytea holds its escape
    (42, b"42"),
    ("null", b"null"),  # JSON null is spelt out; None is a tombstone
    (b"", b""),
])
def test_the_payload_is_stored_as_the_bytes_given(db_url, db, payload, expected):
    with psycopg.connect(db_url, autocommit=True) as conn:
        one = enqueue(conn, topic="t", key="k", payload=payload)
        [many] = enqueue_many(conn, [Event("t", "k", payload)])
    for event_id in (one, many):
        legacy, value, *_ = stored(db, event_id)
        assert legacy is None
        assert value == expected


def test_none_is_a_tombstone_not_json_null(db_url, db):
    with psycopg.connect(db_url, autocommit=True) as conn:
        one = enqueue(conn, topic="t", key="k", payload=None)
        [many] = enqueue_many(conn, [Event("t", "k", None)])
    for event_id in (one, many):
        assert stored(db, event_id)[:2] == (None, None)


def test_operators_read_json_payloads_through_the_view(db_url, db):
    with psycopg.connect(db_url, autocommit=True) as conn:
        as_dict = enqueue(conn, topic="t", key="k", payload={"order": {"id": 7}})
        avro = enqueue(conn, topic="t", key="k", payload=b"\x00\x00\x00\x00\x01\x0eorder-7")
        latin1 = enqueue(conn, topic="t", key="k", payload=b"\xe9t\xe9")
        tombstone = enqueue(conn, topic="t", key=b"\xff", payload=None)
    # and a row written the old way, by plain SQL: jsonb
    legacy = db.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
                        "VALUES ('t', 'k', '{\"b\": 1, \"a\": 2}') RETURNING id").fetchone()[0]
    rows = dict((r[0], r[1:]) for r in db.execute(
        "SELECT id, payload_json->'order'->>'id', payload_json, value, key FROM outbox_events_json"))
    assert rows[as_dict][0] == "7"
    assert rows[avro][1] is None and rows[avro][2] == b"\x00\x00\x00\x00\x01\x0eorder-7"
    assert rows[latin1][1] is None
    assert rows[tombstone][1:] == (None, None, b"\xff")
    assert rows[legacy][1:] == ({"a": 2, "b": 1}, b'{"a": 2, "b": 1}', b"k")  # what it publishes: payload::text


@pytest.mark.parametrize(("payload", "message"), [
    ({"when": object()}, "not bytes, a str or a JSON-serialisable value"),
    ({"x": "a" * 2000}, r"2008 bytes, above the maximum of 1000"),
    (b"\x00" * 1001, r"1001 bytes, above the maximum of 1000"),
    ("\u00e9" * 501, r"1002 bytes, above the maximum of 1000"),  # the limit counts the UTF-8 bytes
])
def test_bad_payload_raises_before_anything_is_written(db_url, db, payload, message):
    with psycopg.connect(db_url) as conn:
        with pytest.raises(PayloadError, match=message):
            enqueue(conn, topic="t", key="k", payload=payload, max_payload_bytes=1000)
        # The caller's transaction is still usable: nothing was sent.
        enqueue(conn, topic="t", key="k", payload=b"\x00" * 1000, max_payload_bytes=1000)
        conn.commit()
    assert count(db) == 1


def test_enqueue_many_is_all_or_nothing_and_ordered(db_url, db):
    with psycopg.connect(db_url) as conn:
        with pytest.raises(PayloadError):
            enqueue_many(conn, [Event("t", "k", {"i": 1}), Event("t", "k", {"bad": {1, 2}})])
        ids = enqueue_many(conn, [Event("t", "k", {"i": i}) for i in range(50)])
        conn.commit()
    assert ids == sorted(ids) and len(ids) == 50
    payloads = [orjson.loads(r[0])["i"] for r in db.execute("SELECT payload_bytes FROM outbox_events ORDER BY id")]
    assert payloads == list(range(50))


def test_async_connections(db_url, db):
    async def main():
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            one = await enqueue(conn, topic="t", key=b"\xfe", payload=b"\x01", headers={"sig": b"\x00\xff"})
            many = await enqueue_many(conn, [Event("t", b"\xfe", None), Event("t", b"\xfe", {"n": 3})])
            await conn.commit()
            return [one, *many]

    ids = asyncio.run(main())
    assert [stored(db, i)[1:4] for i in ids] == [(b"\x01", "\\xfe", b"\xfe"), (None, "\\xfe", b"\xfe"),
                                                 (b'{"n":3}', "\\xfe", b"\xfe")]
    assert stored(db, ids[0])[5] == {"sig": "AP8="}


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


def test_bytes_keys_that_are_text_are_that_text_and_others_are_kept_exactly(db_url, db):
    with psycopg.connect(db_url, autocommit=True) as conn:
        as_text = enqueue(conn, topic="t", key=b"customer-\xc3\xa9", payload={})
        as_str = enqueue(conn, topic="t", key="customer-\u00e9", payload={})
        binary = enqueue(conn, topic="t", key=b"\x00\xffid", payload={})
        [binary_too] = enqueue_many(conn, [Event("t", bytearray(b"\x00\xffid"), {})])
    assert stored(db, as_text)[2:4] == ("customer-\u00e9", None)
    assert stored(db, binary)[2:4] == ("\\x00ff6964", b"\x00\xffid")
    assert stored(db, binary_too)[2:4] == ("\\x00ff6964", b"\x00\xffid")
    shard = dict(db.execute("SELECT id, shard FROM outbox_events").fetchall())
    assert shard[as_text] == shard[as_str] and shard[binary] == shard[binary_too]


@pytest.mark.parametrize("key", [True, 4.2, ("a",), ["a"]])
def test_a_key_of_another_type_is_refused_naming_the_topic(db_url, db, key):
    with psycopg.connect(db_url) as conn:
        with pytest.raises(PayloadError, match=r"key for topic 'orders\.v1' must be a str, bytes, an int or None"):
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


# ---- headers: str values in headers, bytes values in binary_headers -----------------------------

def test_str_header_values_go_to_headers_and_bytes_values_to_binary_headers(db_url, db):
    with psycopg.connect(db_url, autocommit=True) as conn:
        event_id = enqueue(conn, topic="t", key="k", payload={},
                           headers={"traceparent": "00-ab-cd-01", "sig": b"\x00\x01\xfe\xff", "nul": b"x\x00y",
                                    "empty": b""})
    *_, headers, binary = stored(db, event_id)
    assert headers == {"traceparent": "00-ab-cd-01"}
    assert binary == {"sig": "AAH+/w==", "nul": "eAB5", "empty": ""}


@pytest.mark.parametrize("headers", [{"n": 1}, {"ok": True}, {"nested": {"a": "b"}}, {1: "x"}])
def test_a_header_value_that_is_not_str_or_bytes_is_refused(db_url, db, headers):
    with psycopg.connect(db_url) as conn:
        with pytest.raises(PayloadError, match="topic 't'"):
            enqueue(conn, topic="t", key="k", payload={}, headers=headers)
    assert count(db) == 0


def test_plain_sql_cannot_write_binary_headers_that_are_not_an_object(db):
    with pytest.raises(psycopg.errors.CheckViolation, match="outbox_events_binary_headers_is_object"):
        db.execute("INSERT INTO outbox_events (topic, payload_bytes, binary_headers) VALUES ('t', '', '[1]')")
    with pytest.raises(psycopg.errors.CheckViolation, match="outbox_events_one_payload"):
        db.execute("INSERT INTO outbox_events (topic, payload, payload_bytes) VALUES ('t', '{}', 'x')")


def test_postgresql_jsonb_refuses_the_nul_escape(db):
    # Why a str header value may not hold NUL (give it as bytes): headers are jsonb.
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
            with pytest.warns(RuntimeWarning,
                              match=r"enqueue\(topic='orders.v1'\) .* never awaited, so nothing was written"):
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


def test_enqueue_without_notify_can_end_in_two_phase_commit(db_url):
    # PostgreSQL refuses PREPARE TRANSACTION after a NOTIFY: notify=False leaves it out.
    import uuid as _uuid

    from kaireon_pub import Event

    with psycopg.connect(db_url) as conn:
        if conn.execute("SHOW max_prepared_transactions").fetchone()[0] == "0":
            pytest.skip("the server has max_prepared_transactions = 0")
        gid = f"kaireon-{_uuid.uuid4().hex[:8]}"
        first = enqueue(conn, topic="t", key="k", payload={"a": 1}, notify=False)
        more = enqueue_many(conn, [Event("t", "k", {"b": 2})], notify=False)
        conn.execute(f"PREPARE TRANSACTION '{gid}'")
        conn.autocommit = True  # psycopg ends its own transaction block with the PREPARE
        conn.execute(f"COMMIT PREPARED '{gid}'")
        ids = [r[0] for r in conn.execute("SELECT id FROM outbox_events ORDER BY id").fetchall()]
    assert ids == [first, *more]
