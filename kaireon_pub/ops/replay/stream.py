"""`replay`'s reading: the selection after the cursor, read once through a server-side cursor in a
read-only transaction of a connection of its own."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg

from kaireon_pub.ops.replay.selection import Selection
from kaireon_pub.ops.replay.sql import R

FETCH_ROWS = 2000  # rows per fetch of the server-side cursor


def stream(conn: psycopg.Connection, selection: Selection, cursor: tuple[str, int]) -> Iterator[tuple]:
    """The selection's rows after `cursor` in (xid, id) order, read once (`conn`: autocommit, idle,
    this stream's alone). A read-only transaction: no transaction id, so the claim horizon never
    waits for it; no statement or idle timeout (the first fetch sorts the selection, and a slow
    rate leaves it idle between fetches)."""
    conn.read_only = True
    with conn.transaction():
        conn.execute("SELECT set_config('statement_timeout', '0', true), "
                     "set_config('idle_in_transaction_session_timeout', '0', true)")
        with conn.cursor(name="kaireon_pub_replay") as rows:
            rows.itersize = FETCH_ROWS
            rows.execute(R.replay_rows, selection.params(cursor))
            yield from rows
