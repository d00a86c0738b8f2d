"""The application side: write events into outbox_events inside the caller's own transaction.

Nothing here commits: the event becomes visible to the publisher when, and only when, the
caller's transaction commits, and a failed insert aborts that transaction (the spec's respond
hot path). Events are checked before anything is sent to the database: a bad one raises
PayloadError naming its topic, and the caller's transaction stays usable.

What the record carries is byte for byte what was given:
- payload: bytes (bytearray, memoryview) as they are: Avro, Protobuf, JSON text, anything; a str
  as its UTF-8; None as a tombstone (the record's value is null); any other value as its
  `orjson.dumps` bytes (a dict keeps its key order). JSON null is the payload "null" or b"null".
- key: a str (not holding NUL), bytes, an int (as its decimal text, so `key=42`, `key="42"` and
  `key=b"42"` are one key) or None. Bytes that are UTF-8 text without NUL are that text's key.
  At most MAX_KEY_BYTES (1024) bytes as stored: a text key's UTF-8, and for other bytes their
  '\\x' + hex form, so at most 511 of them (migration 0009: a longer key would stop the claim of
  its shard's worker).
- headers: name (str, no NUL) to a str value (no NUL: jsonb cannot hold one) or a bytes value
  (anything); event_type and topic: str without NUL.
- size: the payload's bytes, at most `max_payload_bytes`, else OUTBOX_MAX_PAYLOAD_BYTES from the
  environment (the range the tier accepts, 1..104857600; an invalid value raises ConfigError
  naming the variable), else 1,000,000.

With a psycopg AsyncConnection, `enqueue` and `enqueue_many` return an awaitable and nothing is
written until it is awaited (`await enqueue(aconn, ...)`); the checks above still raise at the
call. An awaitable dropped without being awaited warns (RuntimeWarning) that its event was not
written.

One job, in one file past 300 lines on purpose: the application's write; the checks above are its
contract (they have no other caller), so the contract, its checks and the insert are read together.
"""

from __future__ import annotations

import base64
import os
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
# partition_key as stored, in bytes (the CHECK outbox_events_partition_key_length, migration 0009).
MAX_KEY_BYTES = 1024

T = TypeVar("T")


Key = str | bytes | int | None
HeaderValue = str | bytes

_BYTES = (bytes, bytearray, memoryview)


@dataclass(frozen=True)
class Event:
    topic: str
    key: Key
    payload: Any
    headers: Mapping[str, HeaderValue] | None = None
    event_type: str | None = None


@dataclass(frozen=True)
class _Encoded:
    """One event as the enqueue queries take it."""

    topic: str
    key: str | None  # partition_key: the key's text, or '\\x' + hex for bytes that are not text
    key_bytes: bytes | None  # partition_key_bytes: the exact key when it is not text
    payload: bytes | None  # payload_bytes; None: a tombstone
    headers: str  # JSON object of the str values
    binary_headers: str  # JSON object of the bytes values, base64
    event_type: str | None


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


def _text_field(topic: str, name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{name} for topic {topic!r} must be a str or None, not {type(value).__name__}")
    if "\x00" in value:
        raise PayloadError(f"{name} for topic {topic!r} contains a NUL character, which PostgreSQL text cannot store")
    return value


def _key(topic: str, key: object) -> tuple[str | None, bytes | None]:
    """(partition_key, partition_key_bytes): text keys as text; other bytes exactly, beside a
    text form ('\\x' + hex) that gives them their shard and their place in the key order."""
    if key is None:
        return None, None
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key), None
    if isinstance(key, str):
        if "\x00" in key:
            raise PayloadError(f"key for topic {topic!r} contains a NUL character, which PostgreSQL text "
                               "cannot store (give the key as bytes)")
        return key, None
    if isinstance(key, _BYTES):
        raw = bytes(key)
        if b"\x00" not in raw:
            try:
                return raw.decode("utf-8"), None  # the same key as that str
            except UnicodeDecodeError:
                pass
        return "\\x" + raw.hex(), raw
    raise PayloadError(f"key for topic {topic!r} must be a str, bytes, an int or None, not {type(key).__name__}")


def _payload(topic: str, payload: object) -> bytes | None:
    if payload is None:
        return None
    if isinstance(payload, _BYTES):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    try:
        return orjson.dumps(payload)
    except TypeError as exc:
        raise PayloadError(f"payload for topic {topic!r} is not bytes, a str "
                           f"or a JSON-serialisable value: {exc}") from None


def _headers(topic: str, headers: Mapping[str, HeaderValue] | None) -> tuple[str, str]:
    text: dict[str, str] = {}
    binary: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str):
            raise PayloadError(f"header names for topic {topic!r} must be str, not {type(name).__name__}")
        if "\x00" in name:
            raise PayloadError(f"header {name!r} for topic {topic!r} contains a NUL character, "
                               "which jsonb cannot store")
        if isinstance(value, str):
            if "\x00" in value:
                raise PayloadError(f"header {name!r} for topic {topic!r} contains a NUL character, which jsonb "
                                   "cannot store (give the value as bytes)")
            text[name] = value
        elif isinstance(value, _BYTES):
            binary[name] = base64.b64encode(bytes(value)).decode("ascii")
        else:
            raise PayloadError(f"header {name!r} for topic {topic!r} must be str or bytes, not {type(value).__name__}")
    return orjson.dumps(text).decode(), orjson.dumps(binary).decode()


def _encode(event: Event, limit: int) -> _Encoded:
    topic = event.topic
    if not isinstance(topic, str) or not topic.strip():
        raise PayloadError(f"topic must be a non-empty string, not {topic!r}")
    if "\x00" in topic:
        raise PayloadError(f"topic {topic!r} contains a NUL character, which PostgreSQL text cannot store")
    key, key_bytes = _key(topic, event.key)
    if key is not None and len(key.encode("utf-8")) > MAX_KEY_BYTES:
        if key_bytes is None:
            given = f"{len(key.encode('utf-8'))} bytes"
        else:
            given = f"{len(key_bytes)} bytes, stored as {len(key)} bytes of hex (at most 511 bytes that are not text)"
        raise PayloadError(f"key for topic {topic!r} is {given}, above the maximum of {MAX_KEY_BYTES} bytes")
    event_type = _text_field(topic, "event_type", event.event_type)
    payload = _payload(topic, event.payload)
    if payload is not None and len(payload) > limit:
        raise PayloadError(
            f"payload for topic {topic!r} is {len(payload)} bytes, above the maximum of {limit} "
            f"({MAX_PAYLOAD_VARIABLE})"
        )
    headers, binary_headers = _headers(topic, event.headers)
    return _Encoded(topic, key, key_bytes, payload, headers, binary_headers, event_type)


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
    key: Key,
    payload: Any,
    headers: Mapping[str, HeaderValue] | None = None,
    event_type: str | None = None,
    max_payload_bytes: int | None = None,
    notify: bool = True,
) -> int | PendingWrite[int]:
    """Insert one event in the caller's transaction; returns its id.

    On an AsyncConnection, returns an awaitable: `event_id = await enqueue(aconn, ...)`.
    Raises PayloadError, before anything is written, for an event that cannot be stored.
    `notify=False` leaves out the NOTIFY that wakes the workers at commit (they find the event
    at their next poll): PostgreSQL refuses PREPARE TRANSACTION after a NOTIFY, so a transaction
    that ends in two-phase commit needs it.
    """
    is_async = _check_connection(conn, "enqueue")
    row = _encode(Event(topic, key, payload, headers, event_type), _limit(max_payload_bytes))
    params = {"topic": row.topic, "key": row.key, "key_bytes": row.key_bytes, "payload": row.payload,
              "headers": row.headers, "binary_headers": row.binary_headers, "event_type": row.event_type,
              "notify": notify}
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
    notify: bool = True,
) -> list[int] | PendingWrite[list[int]]:
    """Insert many events in one round trip, in the caller's transaction; returns their ids.

    All events are checked first: one bad event raises PayloadError and nothing is written.
    `notify=False` as for enqueue() (two-phase commit).
    On an AsyncConnection, returns an awaitable: `ids = await enqueue_many(aconn, events)`.
    """
    is_async = _check_connection(conn, "enqueue_many")
    cap = _limit(max_payload_bytes)
    rows = [_encode(e, cap) for e in events]
    params = {
        "topics": [r.topic for r in rows],
        "keys": [r.key for r in rows],
        "key_bytes": [r.key_bytes for r in rows],
        "payloads": [r.payload for r in rows],
        "headers": [r.headers for r in rows],
        "binary_headers": [r.binary_headers for r in rows],
        "event_types": [r.event_type for r in rows],
        "notify": notify,
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
