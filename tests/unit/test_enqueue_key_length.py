"""enqueue/enqueue_many refuse a key over 1024 bytes as stored (migration 0009's CHECK) before
anything is sent to the database; a key at the limit goes through."""

from __future__ import annotations

from unittest import mock

import psycopg
import pytest

from kaireon_pub import Event, enqueue, enqueue_many
from kaireon_pub.enqueue import MAX_KEY_BYTES
from kaireon_pub.errors import PayloadError


def connection() -> mock.MagicMock:
    conn = mock.MagicMock(spec=psycopg.Connection)
    conn.execute.return_value.fetchone.return_value = (1,)
    conn.execute.return_value.fetchall.return_value = [(1,), (2,)]
    return conn


@pytest.mark.parametrize("key, stated", [
    ("k" * 1025, "is 1025 bytes"),
    ("é" * 513, "is 1026 bytes"),  # UTF-8 bytes, not characters
    (b"k" * 3000, "is 3000 bytes"),  # bytes that are text: that text's key
    (b"\xff" * 512, "is 512 bytes, stored as 1026 bytes of hex"),
])
def test_enqueue_refuses_a_key_over_the_limit_and_sends_nothing(key, stated):
    conn = connection()
    with pytest.raises(PayloadError) as refused:
        enqueue(conn, topic="orders", key=key, payload={"a": 1})
    assert stated in str(refused.value)
    assert f"above the maximum of {MAX_KEY_BYTES} bytes" in str(refused.value)
    assert "'orders'" in str(refused.value)
    conn.execute.assert_not_called()


def test_enqueue_many_refuses_the_whole_batch_for_one_long_key():
    conn = connection()
    with pytest.raises(PayloadError, match="key for topic 'orders' is 2000 bytes, above the maximum of 1024"):
        enqueue_many(conn, [Event("orders", "short", {}), Event("orders", "x" * 2000, {})])
    conn.execute.assert_not_called()


@pytest.mark.parametrize("key", ["k" * 1024, "é" * 512, b"\xff" * 511, 10 ** 1023])
def test_a_key_at_the_limit_is_written(key):
    conn = connection()
    assert enqueue(conn, topic="orders", key=key, payload={}) == 1
    params = conn.execute.call_args.args[1]
    assert len(params["key"].encode("utf-8")) <= MAX_KEY_BYTES
    assert enqueue_many(conn, [Event("orders", key, {}), Event("orders", "k", {})]) == [1, 2]
