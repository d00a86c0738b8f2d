"""The application side: write events into outbox_events inside the caller's own transaction.

Nothing here commits: the event becomes visible to the publisher when, and only when, the
caller's transaction commits, and a failed insert aborts that transaction (the spec's respond
hot path). Payloads are checked before anything is sent to the database.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from kaireon_pub.db.queries import Q
from kaireon_pub.errors import PayloadError

DEFAULT_MAX_PAYLOAD_BYTES = 1_000_000


@dataclass(frozen=True)
class Event:
    topic: str
    key: str | None
    payload: Any
    headers: Mapping[str, str] | None = None
    event_type: str | None = None


def _max_payload_bytes() -> int:
    text = os.environ.get("OUTBOX_MAX_PAYLOAD_BYTES", "")
    return int(text) if text.strip().isdigit() else DEFAULT_MAX_PAYLOAD_BYTES


def _encode(event: Event, limit: int) -> tuple[str, str | None, str, str, str | None]:
    if not isinstance(event.topic, str) or not event.topic.strip():
        raise PayloadError("topic must be a non-empty string")
    if event.key is not None and not isinstance(event.key, str):
        raise PayloadError(f"key must be a string or None, not {type(event.key).__name__}")
    if isinstance(event.payload, (bytes, bytearray, memoryview, str)):
        # Already JSON text: check it parses, but store it as given (no re-dump).
        raw = bytes(event.payload) if not isinstance(event.payload, str) else event.payload.encode()
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PayloadError(f"payload for topic {event.topic!r} is not valid JSON text: {exc}") from None
    else:
        try:
            raw = orjson.dumps(event.payload)
        except TypeError as exc:
            raise PayloadError(f"payload for topic {event.topic!r} is not JSON-serialisable: {exc}") from None
    if len(raw) > limit:
        raise PayloadError(
            f"payload for topic {event.topic!r} is {len(raw)} bytes, above the maximum of {limit} "
            "(OUTBOX_MAX_PAYLOAD_BYTES)"
        )
    if b"\\u0000" in raw:
        raise PayloadError(f"payload for topic {event.topic!r} contains \\u0000, which jsonb cannot store")
    headers = dict(event.headers or {})
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise PayloadError(f"headers must map str to str; got {name!r}: {type(value).__name__}")
    return (event.topic, event.key, raw.decode(), orjson.dumps(headers).decode(), event.event_type)


def _one_params(event: Event, limit: int | None) -> dict[str, Any]:
    topic, key, payload, headers, event_type = _encode(event, limit or _max_payload_bytes())
    return {"topic": topic, "key": key, "payload": payload, "headers": headers, "event_type": event_type}


def _many_params(events: Iterable[Event], limit: int | None) -> dict[str, list[Any]]:
    cap = limit or _max_payload_bytes()
    rows = [_encode(e, cap) for e in events]
    return {
        "topics": [r[0] for r in rows],
        "keys": [r[1] for r in rows],
        "payloads": [r[2] for r in rows],
        "headers": [r[3] for r in rows],
        "event_types": [r[4] for r in rows],
    }


def enqueue(
    conn: psycopg.Connection | psycopg.AsyncConnection,
    *,
    topic: str,
    key: str | None,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    event_type: str | None = None,
    max_payload_bytes: int | None = None,
) -> int | Awaitable[int]:
    """Insert one event in the caller's transaction; returns its id (awaitable for async conns).

    `payload` is any orjson-serialisable value, or JSON text (str/bytes) stored as given.
    Raises PayloadError, before anything is written, for a payload that is not JSON or too large.
    """
    params = _one_params(Event(topic, key, payload, headers, event_type), max_payload_bytes)
    if isinstance(conn, psycopg.AsyncConnection):
        return _enqueue_async(conn, params)
    return conn.execute(Q.enqueue_one, params).fetchone()[0]


async def _enqueue_async(conn: psycopg.AsyncConnection, params: dict[str, Any]) -> int:
    cursor = await conn.execute(Q.enqueue_one, params)
    return (await cursor.fetchone())[0]


def enqueue_many(
    conn: psycopg.Connection | psycopg.AsyncConnection,
    events: Iterable[Event],
    *,
    max_payload_bytes: int | None = None,
) -> list[int] | Awaitable[list[int]]:
    """Insert many events in one round trip, in the caller's transaction; returns their ids.

    All events are checked first: one bad payload raises PayloadError and nothing is written.
    """
    params = _many_params(events, max_payload_bytes)
    if not params["topics"]:
        return [] if not isinstance(conn, psycopg.AsyncConnection) else _empty()
    if isinstance(conn, psycopg.AsyncConnection):
        return _enqueue_many_async(conn, params)
    return [row[0] for row in conn.execute(Q.enqueue_many, params).fetchall()]


async def _empty() -> list[int]:
    return []


async def _enqueue_many_async(conn: psycopg.AsyncConnection, params: dict[str, Any]) -> list[int]:
    cursor = await conn.execute(Q.enqueue_many, params)
    return [row[0] for row in await cursor.fetchall()]
