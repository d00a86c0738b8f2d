"""One publisher worker: claim a batch of its shards, publish it, settle it; repeat.

The worker is a few tasks side by side on one event loop, none waiting on another's slow step:
- the claim -> publish -> settle loop (`run()` around `Tick.run()`), with the failure streak;
- the lease keeper (worker/keeper.py): renews leases and the registration on its own clock and
  connection, and rebalances;
- the broker watch (worker/health.py): notices a different cluster behind the bootstrap address;
- worker 0's housekeeping (worker/housekeeping.py): backlog gauges and the retention purge;
- the producer's delivery thread (worker/kafka/), which serves librdkafka busy or idle.
The side tasks run in a TaskSet (worker/lifecycle.py), which reports one that dies.

`Worker` builds the parts and runs them; each part owns its state:
- `Tick` (tick.py): the preflight recoveries in order, then one cycle in status or lock mode;
- `Claimer` (claim.py): the claim statement, NOWAIT and the careful retry;
- `ShardScan` (scan.py): cursors, rescans, rotation, rows another session locks (no I/O);
- `Horizon` (horizon.py): the claim horizon and the transactions it stopped waiting for;
- `Settler` (settle.py): the marks, a batch left unsettled by a blip, the accounting;
- `FailureStreak` (failures.py): classify, log with an errorId, back off or exit 3;
- `ProducerHealth` (health.py): stalls, producer errors, the broker watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable

import psycopg
import psycopg_pool

from kaireon_pub import metrics
from kaireon_pub.db.connect import (
    async_connector,
    connection_class,
    listen_connector,
    listen_url,
    session_options,
)
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.settings import Settings
from kaireon_pub.worker import auditor, deadletter, housekeeping
from kaireon_pub.worker.claim import Claimer
from kaireon_pub.worker.failures import FailureStreak, classify_db_error, database_refusal
from kaireon_pub.worker.health import ProducerHealth
from kaireon_pub.worker.horizon import Horizon
from kaireon_pub.worker.kafka import tracing
from kaireon_pub.worker.kafka.publisher import Publisher
from kaireon_pub.worker.keeper import LeaseKeeper
from kaireon_pub.worker.leases import Leases, RebalanceResult
from kaireon_pub.worker.lifecycle import TaskSet, every
from kaireon_pub.worker.rows import TickResult
from kaireon_pub.worker.scan import ShardScan
from kaireon_pub.worker.settle import Settler
from kaireon_pub.worker.tick import Tick
from kaireon_pub.worker.wake import Listener

log = logging.getLogger("kaireon_pub.worker")

__all__ = ["TickResult", "Worker", "classify_db_error"]


class Worker:
    def __init__(self, settings: Settings, slot: int, worker_id: uuid.UUID,
                 heartbeat: Callable[[], None], dead_worker_ids: list[uuid.UUID]):
        self.settings = settings
        self.slot = slot
        self.worker_id = worker_id
        self.heartbeat = heartbeat
        self.session_tag = f"worker-{slot}.{worker_id.hex[:8]}"
        # The supervisor runs settings.workers of us: each takes its share from its first round.
        self.leases = Leases(worker_id, slot, settings.lease_ttl_seconds, siblings=settings.workers)
        self.scan = ShardScan(strict=settings.ordering == "strict", batch_size=settings.batch_size,
                              rescan_interval_s=settings.rescan_interval_ms / 1000)
        # The keeper's statements must end well inside a renewal interval.
        keeper_timeout_ms = max(500, min(settings.statement_timeout_ms, settings.lease_ttl_seconds * 1000 // 3))
        # Behind a transaction pooler the keeper cannot LISTEN on its connection: it polls instead.
        self.keeper = LeaseKeeper(self.leases, self._connector("leases", keeper_timeout_ms), self._on_leases_changed,
                                  listen=settings.pool_mode == "session")
        self.listener = Listener(self._connector("listen"), self.scan.rescan_all)
        self.horizon = Horizon(settings.horizon_max_wait_ms, self.scan)
        self.claimer = Claimer(self.scan, settings)
        self.health = ProducerHealth(slot)
        self.settler = Settler(settings, self.scan, self.health)
        self.streak = FailureStreak(settings.max_consecutive_failures, settings.poll_interval_ms / 1000,
                                    lambda: database_refusal(self._connector("probe")))
        self.tick = Tick(self, dead_worker_ids)
        self.tasks = TaskSet(self._side_task_died)
        self.stop_requested = False
        self.drain_deadline = float("inf")
        self.shards_changed = False
        self.exit_code = ExitCode.OK
        self.pool: psycopg_pool.AsyncConnectionPool | None = None
        self.tracing: tracing.Tracing | None = None  # None unless OTEL_TRACES_EXPORTER and the otel extra
        self.parent_pid = os.getppid()

    @property
    def publisher(self) -> Publisher | None:
        return self.health.publisher

    # ---- the loop ----------------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            await self.boot()
            while not self.stop_requested:
                self.heartbeat()
                if os.getppid() != self.parent_pid:
                    log.error("supervisor is gone; stopping", extra={"event": "orphaned"})
                    break
                started = time.monotonic()
                try:
                    result = await self.tick.run()
                except Exception as exc:  # noqa: BLE001 - every failure is classified and logged
                    exit_code = await self.streak.failed(exc)
                    if exit_code is not None:
                        return exit_code
                    await self.wait_for_work(self.streak.backoff(), notified_ends=False)
                    continue
                finally:
                    metrics.TICK_DURATION.observe(time.monotonic() - started)
                self.streak.succeeded()
                # A claim that looked at a full batch of rows it had to hold back (strict order)
                # moved its cursors past them: claim again now, the rows behind them are due.
                if result.claimed == 0 and not self.scan.last_claim_full:
                    await self.wait_for_work(self.settings.poll_interval_ms / 1000)
            return self.exit_code
        finally:
            await self.shutdown()

    async def wait_for_work(self, timeout: float, *, notified_ends: bool = True) -> None:
        """Sleep until NOTIFY (enqueue commits), new shards, a stop, or `timeout`; heartbeat at
        least every second. The back-off after a failed tick (`notified_ends=False`) ends only at
        a stop or its timeout: under enqueue load a failing tick must not retry at the commit rate
        (nor reach OUTBOX_MAX_CONSECUTIVE_FAILURES within a second)."""
        deadline = time.monotonic() + timeout
        while not self.stop_requested:
            if self.shards_changed and notified_ends:
                self.shards_changed = False
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.heartbeat()
            if await self.listener.wait(min(1.0, remaining)) and notified_ends:
                return

    # ---- signals (handlers only record the request) ------------------------------------------

    def request_stop(self) -> None:
        if self.stop_requested:
            # A second signal shortens the drain: purge and release now.
            self.drain_deadline = time.monotonic()
        else:
            self.stop_requested = True
            self.keeper.draining = True  # renew until the release, acquire nothing more
            # Leave a margin inside the supervisor's budget for marking and releasing.
            budget = self.settings.shutdown_drain_timeout_ms / 1000
            self.drain_deadline = time.monotonic() + max(0.5, budget - 2.0)

    def cut_off(self) -> float:
        """When the batch in flight must give up: the drain deadline, or shortly before the leases
        may have expired (a batch never outlives its lease)."""
        margin = min(1.0, self.settings.lease_ttl_seconds / 4)
        return min(self.drain_deadline, self.leases.valid_until - margin)

    def _side_task_died(self, name: str) -> None:
        """A side task the worker must not run without died (TaskSet logged it): drain and exit 1,
        the supervisor starts a fresh worker."""
        self.exit_code = ExitCode.CRASH
        if not self.stop_requested:
            self.request_stop()

    def _on_leases_changed(self, result: RebalanceResult) -> None:
        self.scan.shards_changed(result.acquired, result.released + result.lost)
        if result.acquired:
            self.shards_changed = True

    # ---- boot and shutdown -------------------------------------------------------------------------

    def _connector(self, role: str, statement_timeout_ms: int | None = None):
        settings = self.settings
        if role == "listen" and listen_url(settings) is None:
            return None  # behind a transaction pooler with no session of the server's own: polling

        async def connect() -> psycopg.AsyncConnection:
            name = f"{self.session_tag}-{role}"
            if role == "listen":
                return await listen_connector(settings, name)()
            return await async_connector(settings, name, publisher=True, statement_timeout_ms=statement_timeout_ms)()
        return connect

    async def boot(self) -> None:
        s = self.settings
        # The producer first: a bad librdkafka setting fails before any connection is opened.
        # The tracer provider is made here, after fork (its export threads do not survive one).
        self.tracing = tracing.setup(os.environ, slot=self.slot)
        self.health.publisher = Publisher(s, client_id=f"kaireon-pub-{self.slot}", tracing=self.tracing)
        self.pool = psycopg_pool.AsyncConnectionPool(
            s.database_url, min_size=1, max_size=4, open=False, name=f"worker-{self.slot}",
            # The session name carries the worker id, so a peer can tell this worker's sessions
            # (kaireon-pub:worker-<slot>.<id>) and end them if it freezes holding lease locks.
            kwargs={"autocommit": True, **session_options(s, self.session_tag, publisher=True)},
            # Behind a transaction pooler: a class that sets the session's settings in every transaction.
            connection_class=connection_class(s, self.session_tag, publisher=True),
            timeout=5,
        )
        await self.pool.open(wait=False)
        stopping = lambda: self.stop_requested  # noqa: E731
        self.tasks.start("lease-keeper", self.keeper.run, restart=False)
        self.tasks.start("broker-watch", lambda: every(self.health.watch_once, stopping))
        auditor.start(self.tasks, s, self.pool, lambda: self.leases.owned, stopping)  # OUTBOX_AUDIT_SAMPLE_PER_MINUTE
        deadletter.start(self, stopping)  # OUTBOX_DEAD_LETTER_TOPIC: failed events to the dead-letter topic
        if self.slot == 0:
            housekeeping.start(self.tasks, s, self.pool, self.session_tag, stopping,
                               lambda: self.scan.last_claim_full)
        # The first lease round usually takes milliseconds; do not idle a poll interval before it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.keeper.first_round.wait(), 5)

    async def shutdown(self) -> None:
        await self.keeper.stop()
        await self.tasks.stop()
        await self.keeper.close()
        await self.listener.close()
        if self.pool is not None:
            try:
                if self.settler.unsettled:
                    await self.settler.settle_again(self.pool, self.streak.last_error_id)
                released = await self._release_shards()
                log.info("drain finished; shards released", extra={"event": "drain done", "shards": released})
            except Exception as exc:  # noqa: BLE001 - the drain must finish; the error is logged with an id
                log.error(f"drain could not release shards: {type(exc).__name__}: {exc}",
                          extra={"event": "drain failed", "errorId": new_error_id(), "isTransient": True})
            await self.pool.close(timeout=2)
        if self.publisher is not None:
            await self.publisher.close()
        if self.tracing is not None:
            # The spans of the last batches are exported within the drain budget (5 s at most).
            await self.tracing.close(min(5.0, max(0.5, self.drain_deadline - time.monotonic())))
        metrics.IN_FLIGHT.set(0)

    async def _release_shards(self) -> int:
        """Hand every shard back now, so peers take them at once instead of after the TTL: on a
        pooled connection, or on a connection of its own when the pool has none to give (its
        connections may have gone with the tasks cancelled just before)."""
        try:
            async with self.pool.connection(timeout=2) as conn:
                return await self.leases.release_all(conn)
        except psycopg_pool.PoolTimeout:
            conn = await self._connector("drain")()
            try:
                return await self.leases.release_all(conn)
            finally:
                await conn.close()
