"""Backlogs written in bulk (INSERT … SELECT generate_series), ~300 B payloads over 1,000 keys.

The rows are written as enqueue() writes them since migration 0003 (payload_bytes), with the
bytes a jsonb payload of the same content rendered to before (so a before/after comparison sends
the same values to the broker).

The payload carries hex digests so that lz4 cannot shrink it to nothing, as it would a padding
of one repeated character: the broker side then pays for real bytes.
"""

from __future__ import annotations

import time

import psycopg

KEYS = 1000

_INSERT = """
INSERT INTO outbox_events (topic, partition_key, payload_bytes, event_type {extra_cols})
SELECT %(topic)s, 'agg-' || (g %% %(keys)s),
       convert_to(jsonb_build_object('n', g, 'aggregate', 'agg-' || (g %% %(keys)s), 'data',
           md5(g::text) || md5((g + 1)::text) || md5((g + 2)::text) || md5((g + 3)::text) ||
           md5((g + 4)::text) || md5((g + 5)::text) || md5((g + 6)::text) || md5((g + 7)::text))::text, 'UTF8'),
       'bench.event' {extra_vals}
FROM generate_series(%(start)s::bigint, %(end)s::bigint) g
"""


def load(url: str, topic: str, n: int, *, start: int = 1, notify: bool = True) -> float:
    """Commit n pending events in one transaction; returns time.monotonic() right after COMMIT.

    One transaction makes the whole backlog appear at once to a tier that is already running,
    so the drain is timed from the commit, without the tier's start-up in it.
    """
    with psycopg.connect(url) as conn:
        conn.execute(_INSERT.format(extra_cols="", extra_vals=""),
                     {"topic": topic, "keys": KEYS, "start": start, "end": start + n - 1})
        if notify:
            conn.execute("SELECT pg_notify('kaireon_outbox', '')")
        conn.commit()
        return time.monotonic()


def load_published(url: str, topic: str, n: int, *, start: int, age_seconds: int = 86400) -> None:
    """n rows already published long ago: work for the retention purge."""
    extra_cols = ", status, published_at"
    extra_vals = ", 'published', clock_timestamp() - make_interval(secs => %(age)s)"
    with psycopg.connect(url) as conn:
        conn.execute(_INSERT.format(extra_cols=extra_cols, extra_vals=extra_vals),
                     {"topic": topic, "keys": KEYS, "start": start, "end": start + n - 1, "age": age_seconds})
        conn.commit()


def payload(n: int, noise: bytes) -> bytes:
    """A payload of the same shape and size as the SQL one, for the produce ceiling."""
    return b'{"n": %d, "data": "%s", "aggregate": "agg-%d"}' % (n, noise, n % KEYS)
