"""The application side: write events into outbox_events inside the caller's own transaction.

Nothing here commits: the event becomes visible to the publisher when, and only when, the
caller's transaction commits, and a failed insert aborts that transaction (the spec's respond
hot path). Events are checked before anything is sent to the database: a bad one raises
PayloadError naming its topic, and the caller's transaction stays usable.

What is accepted:
- topic: a non-empty str; key: a str, an int (stored, and sent to Kafka, as its decimal text, so
  `key=42` and `key="42"` are the same key) or None; event_type: a str or None; headers: str to
  str. None of these may hold a NUL character (PostgreSQL text cannot).
- payload: any orjson-serialisable value, or JSON text (str/bytes) stored as given. jsonb
  cannot hold the NUL character, so a string holding one (JSON `\\u0000`) is refused; the six
  characters backslash-u-0-0-0-0 inside a string (JSON `\\\\u0000`) are ordinary text and stored.
- size: at most `max_payload_bytes`, else OUTBOX_MAX_PAYLOAD_BYTES from the environment (the
  same range the tier accepts, 1..104857600; an invalid value raises ConfigError naming the
  variable), else 1,000,000 bytes of JSON.

With a psycopg AsyncConnection, `enqueue` and `enqueue_many` return an awaitable and nothing is
written until it is awaited (`await enqueue(aconn, ...)`); the checks above still raise at the
call. An awaitable dropped without being awaited warns (RuntimeWarning) that its event was not
written.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Awaitable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
import psycopg

from kaireon_pub.db.queries import Q
from kaireon_pub.errors import ConfigError, PayloadError

DEFAULT_MAX_PAYLOAD_BYTES = 1_000_000
MAX_PAYLOAD_VARIABLE = "OUTBOX_MAX_PAYLOAD_BYTES"
# The range the tier's settings accept for OUTBOX_MAX_PAYLOAD_BYTES.
MAX_PAYLOAD_RANGE = (1, 104_857_600)

# A \u0000 escape in JSON text: an odd number of backslashes before "u0000" (an even number is
# escaped backslashes followed by plain text). JSON allows backslashes only inside strings.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")

T = TypeVar("T")


@dataclass(frozen=True)
class Event:
    topic: str
    key: str | int | None
    payload: Any
    headers: Mapping[str, str] | None = None
    event_type: str | None = None


def max_payload_bytes_from_env(environ: Mapping[str, str] | None = None) -> int:
    """OUTBOX_MAX_PAYLOAD_BYTES, or the default when it is unset; ConfigError when invalid."""
    env = os.environ if environ is None else environ
    text = env.get(MAX_PAYLOAD_VARIABLE)
    if text is None:
        return DEFAULT_MAX_PAYLOAD_BYTES
    lo, hi = MAX_PAYLOAD_RANGE
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(MAX_PAYLOAD_VARIABLE, f"{text!r} is not an integer", f"{lo}..{hi}") from None
    if not lo <= value <= hi:
        raise ConfigError(MAX_PAYLOAD_VARIABLE, f"{value} is out of range", f"{lo}..{hi}")
    return value


def _limit(max_payload_bytes: int | None) -> int:
    if max_payload_bytes is None:
        return max_payload_bytes_from_env()
    if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int) or max_payload_bytes < 1:
        raise ValueError(f"max_payload_bytes must be a positive int, not {max_payload_bytes!r}")
    return max_payload_bytes


def _text_field(topic: str, name: str, value: object, *, allow_int: bool = False) -> str | None:
    if value is None:
        return None
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        kinds = "a str, an int or None" if allow_int else "a str or None"
        raise PayloadError(f"{name} for topic {topic!r} must be {kinds}, not {type(value).__name__}")
    if "\x00" in value:
        raise PayloadError(f"{name} for topic {topic!r} contains a NUL character, which PostgreSQL text cannot store")
    return value


def _encode(event: Event, limit: int) -> tuple[str, str | None, str, str, str | None]:
    topic = event.topic
    if not isinstance(topic, str) or not topic.strip():
        raise PayloadError(f"topic must be a non-empty string, not {topic!r}")
    if "\x00" in topic:
        raise PayloadError(f"topic {topic!r} contains a NUL character, which PostgreSQL text cannot store")
    key = _text_field(topic, "key", event.key, allow_int=True)
    event_type = _text_field(topic, "event_type", event.event_type)
    if isinstance(event.payload, (bytes, bytearray, memoryview, str)):
        # Already JSON text: check it parses, but store it as given (no re-dump).
        raw = bytes(event.payload) if not isinstance(event.payload, str) else event.payload.encode()
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PayloadError(f"payload for topic {topic!r} is not valid JSON text: {exc}") from None
    else:
        try:
            raw = orjson.dumps(event.payload)
        except TypeError as exc:
            raise PayloadError(f"payload for topic {topic!r} is not JSON-serialisable: {exc}") from None
    if len(raw) > limit:
        raise PayloadError(
            f"payload for topic {topic!r} is {len(raw)} bytes, above the maximum of {limit} "
            f"({MAX_PAYLOAD_VARIABLE})"
        )
    if b"\\u0000" in raw and _NUL_ESCAPE.search(raw):  # the substring test is the fast path
        raise PayloadError(f"payload for topic {topic!r} holds a NUL character (\\u0000), which jsonb cannot store")
    headers = dict(event.headers or {})
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise PayloadError(f"headers for topic {topic!r} must map str to str; got {name!r}: {type(value).__name__}")
        if "\x00" in name or "\x00" in value:
            raise PayloadError(f"header {name!r} for topic {topic!r} contains a NUL character, which jsonb cannot store")
    return (topic, key, raw.decode(), orjson.dumps(headers).decode(), event_type)


class PendingWrite(Awaitable[T], Generic[T]):
    """What enqueue/enqueue_many return for an AsyncConnection: nothing is written until it is
    awaited. Dropped unawaited, it warns that the event was not written."""

    __slots__ = ("_coro", "_what", "_awaited")

    def __init__(self, coro: Coroutine[Any, Any, T], what: str):
        self._coro = coro
        self._what = what
        self._awaited = False

    def __await__(self) -> Generator[Any, None, T]:
        self._awaited = True
        return self._coro.__await__()

    def __repr__(self) -> str:
        return f"<PendingWrite {self._what}: await it to write>"

    def __del__(self) -> None:
        if not self._awaited:
            self._coro.close()  # instead of Python's generic "coroutine ... was never awaited"
            warnings.warn(f"{self._what} on an AsyncConnection was never awaited, so nothing was "
                          "written: use `await` on its result", RuntimeWarning, stacklevel=2)


def _check_connection(conn: object, function: str) -> bool:
    """True for an AsyncConnection, False for a Connection; TypeError for anything else."""
    if isinstance(conn, psycopg.AsyncConnection):
        return True
    if isinstance(conn, psycopg.Connection):
        return False
    raise TypeError(f"{function}() needs a psycopg Connection or AsyncConnection (the one of the "
                    f"caller's transaction), not {type(conn).__name__}")


def enqueue(
    conn: psycopg.Connection | psycopg.AsyncConnection,
    *,
    topic: str,
    key: str | int | None,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    event_type: str | None = None,
    max_payload_bytes: int | None = None,
) -> int | PendingWrite[int]:
    """Insert one event in the caller's transaction; returns its id.

    On an AsyncConnection, returns an awaitable: `event_id = await enqueue(aconn, ...)`.
    Raises PayloadError, before anything is written, for an event that cannot be stored.
    """
    is_async = _check_connection(conn, "enqueue")
    topic, key, payload_text, headers_text, event_type = _encode(
        Event(topic, key, payload, headers, event_type), _limit(max_payload_bytes))
    params = {"topic": topic, "key": key, "payload": payload_text, "headers": headers_text,
              "event_type": event_type}
    if is_async:
        return PendingWrite(_enqueue_async(conn, params), f"enqueue(topic={topic!r})")  # type: ignore[arg-type]
    return conn.execute(Q.enqueue_one, params).fetchone()[0]  # type: ignore[union-attr]


async def _enqueue_async(conn: psycopg.AsyncConnection, params: dict[str, Any]) -> int:
    cursor = await conn.execute(Q.enqueue_one, params)
    return (await cursor.fetchone())[0]


def enqueue_many(
    conn: psycopg.Connection | psycopg.AsyncConnection,
    events: Iterable[Event],
    *,
    max_payload_bytes: int | None = None,
) -> list[int] | PendingWrite[list[int]]:
    """Insert many events in one round trip, in the caller's transaction; returns their ids.

    All events are checked first: one bad event raises PayloadError and nothing is written.
    On an AsyncConnection, returns an awaitable: `ids = await enqueue_many(aconn, events)`.
    """
    is_async = _check_connection(conn, "enqueue_many")
    cap = _limit(max_payload_bytes)
    rows = [_encode(e, cap) for e in events]
    params = {
        "topics": [r[0] for r in rows],
        "keys": [r[1] for r in rows],
        "payloads": [r[2] for r in rows],
        "headers": [r[3] for r in rows],
        "event_types": [r[4] for r in rows],
    }
    if is_async:
        return PendingWrite(_enqueue_many_async(conn, params), f"enqueue_many({len(rows)} events)")  # type: ignore[arg-type]
    if not rows:
        return []
    return [row[0] for row in conn.execute(Q.enqueue_many, params).fetchall()]  # type: ignore[union-attr]


async def _enqueue_many_async(conn: psycopg.AsyncConnection, params: dict[str, Any]) -> list[int]:
    if not params["topics"]:
        return []
    cursor = await conn.execute(Q.enqueue_many, params)
    return [row[0] for row in await cursor.fetchall()]
