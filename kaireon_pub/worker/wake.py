"""Waking the worker: LISTEN/NOTIFY on its own connection, with polling as the fallback.

The connection is a session of the server's own: DATABASE_URL in session mode, or
OUTBOX_LISTEN_DATABASE_URL. Behind a transaction pooler without one there is no connector: a
LISTEN through the pooler registers on whichever server connection ran it, and notifications
would reach other clients or nobody, so the worker polls every OUTBOX_POLL_INTERVAL_MS instead.

A busy worker never waits: before each claim it takes in the notifications that have arrived
(`take_notices`, no waiting), so a rescan notice (a row reset to pending behind its cursors by the
reaper or a requeue) reaches its scan before the next claim, not only when it is idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg

log = logging.getLogger("kaireon_pub.worker.wake")

CHANNEL_WORK = "kaireon_outbox"  # enqueue() commits
CHANNEL_RESCAN = "kaireon_outbox_rescan"  # rows went back to pending behind the cursors
RECONNECT_PAUSE_S = 5.0  # a busy worker tries its LISTEN connection again at most this often


class Listener:
    def __init__(self, connect: Callable[[], Awaitable[psycopg.AsyncConnection]] | None,
                 on_rescan: Callable[[], None], clock: Callable[[], float] = time.monotonic):
        self.connect = connect
        self.on_rescan = on_rescan
        self.clock = clock
        self.conn: psycopg.AsyncConnection | None = None
        self.retry_at = 0.0
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
            await self._listen()
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

    async def take_notices(self) -> None:
        """The notifications that have arrived, taken in without waiting (before each claim): a
        rescan notice rewinds the scan now, even while the worker is too busy to wait for work.
        A work notice needs nothing: the claim that follows sees the rows it announced."""
        if self.connect is None or (self.conn is None and self.clock() < self.retry_at):
            return
        try:
            await self._listen()
            async for note in self.conn.notifies(timeout=0):
                self._on_notify(note.channel)
        except psycopg.Error:
            # The database is away: the tick reports it; the connection is tried again shortly.
            await self.close()
            self.retry_at = self.clock() + RECONNECT_PAUSE_S

    async def _listen(self) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = await self.connect()
            await self.conn.execute(f"LISTEN {CHANNEL_WORK}")
            await self.conn.execute(f"LISTEN {CHANNEL_RESCAN}")
            # Notices sent while nothing listened (before the first, or since a lost connection) are lost.
            self.on_rescan()

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
