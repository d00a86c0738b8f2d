"""Waking the worker: LISTEN/NOTIFY on its own connection, with polling as the fallback.

The connection is a session of the server's own: DATABASE_URL in session mode, or
OUTBOX_LISTEN_DATABASE_URL. Behind a transaction pooler without one there is no connector: a
LISTEN through the pooler registers on whichever server connection ran it, and notifications
would reach other clients or nobody, so the worker polls every OUTBOX_POLL_INTERVAL_MS instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import psycopg

log = logging.getLogger("kaireon_pub.worker.wake")

CHANNEL_WORK = "kaireon_outbox"  # enqueue() commits
CHANNEL_RESCAN = "kaireon_outbox_rescan"  # rows went back to pending behind the cursors


class Listener:
    def __init__(self, connect: Callable[[], Awaitable[psycopg.AsyncConnection]] | None,
                 on_rescan: Callable[[], None]):
        self.connect = connect
        self.on_rescan = on_rescan
        self.conn: psycopg.AsyncConnection | None = None
        if connect is None:
            log.info("no LISTEN connection (transaction pooling without OUTBOX_LISTEN_DATABASE_URL): polling",
                     extra={"event": "polling"})

    async def wait(self, timeout: float) -> bool:
        """True when a notification arrived within `timeout` seconds."""
        if self.connect is None:
            # Polling: the caller claims again after the poll interval (in slices of a second).
            await asyncio.sleep(timeout)
            return False
        try:
            if self.conn is None or self.conn.closed:
                self.conn = await self.connect()
                await self.conn.execute(f"LISTEN {CHANNEL_WORK}")
                await self.conn.execute(f"LISTEN {CHANNEL_RESCAN}")
            woke = False
            async for note in self.conn.notifies(timeout=timeout, stop_after=1):
                woke = True
                self._on_notify(note.channel)
            if woke:
                # Drain what else is buffered, so a burst of commits wakes us once.
                async for note in self.conn.notifies(timeout=0.001):
                    self._on_notify(note.channel)
            return woke
        except psycopg.Error:
            # The database is away: fall back to polling; the tick reports the failure.
            await self.close()
            await asyncio.sleep(timeout)
            return False

    def _on_notify(self, channel: str) -> None:
        if channel == CHANNEL_RESCAN:
            self.on_rescan()

    async def close(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None
