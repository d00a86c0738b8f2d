"""The Worker as it is built (its constructor opens nothing): its parts wired together, the run
loop on one screen, the tick's recoveries in order, shards that change, a side task whose death
stops the worker, and worker 0's chores logging as before."""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid

from kaireon_pub import metrics
from kaireon_pub.errors import ExitCode
from kaireon_pub.worker import housekeeping, lifecycle
from kaireon_pub.worker import loop as loop_module
from kaireon_pub.worker.leases import RebalanceResult
from kaireon_pub.worker.loop import Worker
from tests.unit.worker_fakes import settings, value


def make_worker(**env) -> Worker:
    return Worker(settings(**env), 0, uuid.uuid4(), lambda: None, [uuid.uuid4()])


def test_run_fits_on_one_screen():
    assert len(inspect.getsource(Worker.run).splitlines()) <= 40


def test_the_parts_share_one_scan():
    w = make_worker(OUTBOX_ORDERING="relaxed")
    assert w.horizon.scan is w.scan and w.claimer.scan is w.scan and w.settler.scan is w.scan
    assert w.settler.health is w.health and not w.scan.strict
    assert w.pool is None and w.publisher is None  # nothing opened before boot()


def test_the_tick_recovers_in_order():
    w = make_worker()
    assert [r.name for r in w.tick.recoveries] == [
        "producer", "database probe", "unsettled batch", "crash recovery", "orphaned claims", "foreign rows",
        "lease round"]
    w.leases.valid_until = float("inf")
    due = {r.name for r in w.tick.recoveries if r.name != "producer" and r.due()}
    assert due == {"crash recovery", "foreign rows"}  # a fresh worker with a dead predecessor


def test_shards_that_come_start_afresh_and_wake_the_loop():
    w = make_worker()
    w.scan.cursors = {1: (1, 1), 2: (2, 2), 3: (3, 3)}
    w._on_leases_changed(RebalanceResult(live_workers=1, released=[2], lost=[3]))
    assert w.scan.cursors == {1: (1, 1)} and not w.shards_changed
    w._on_leases_changed(RebalanceResult(live_workers=1, acquired=[1]))
    assert w.scan.cursors == {} and w.shards_changed


def test_a_dead_lease_keeper_drains_the_worker_and_exits_1():
    w = make_worker()

    async def keeper() -> None:
        raise RuntimeError("bug")

    async def main() -> None:
        await w.tasks.start("lease-keeper", keeper, restart=False)

    asyncio.run(main())
    assert w.stop_requested and w.exit_code == ExitCode.CRASH and w.keeper.draining


def test_request_stop_twice_shortens_the_drain():
    w = make_worker(OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS=10_000)
    w.request_stop()
    first = w.drain_deadline
    w.request_stop()
    assert w.stop_requested and w.drain_deadline < first


class DownPool:
    def connection(self):
        raise OSError("database away")


def test_the_gauges_chore_logs_a_failed_refresh_as_before(monkeypatch, caplog):
    pauses: list[float] = []

    async def sleep(delay: float) -> None:
        pauses.append(delay)

    monkeypatch.setattr(lifecycle.asyncio, "sleep", sleep)
    s = settings(OUTBOX_POLL_INTERVAL_MS=200)
    asyncio.run(housekeeping.gauges_loop(s, DownPool(), lambda: bool(pauses)))
    assert pauses == [0.2] and value(metrics.DATABASE_UP) == 0
    line = caplog.records[-1]
    assert line.getMessage() == "pending count refresh failed: OSError: database away"
    assert (line.name, line.event, line.isTransient, line.levelno) == (
        "kaireon_pub.worker.housekeeping", "gauges failed", True, logging.WARNING)


def test_the_purge_chore_waits_while_a_backlog_drains_and_logs_a_failure_as_before(monkeypatch, caplog):
    pauses: list[float] = []

    async def sleep(delay: float) -> None:
        pauses.append(delay)

    monkeypatch.setattr(lifecycle.asyncio, "sleep", sleep)
    s = settings(OUTBOX_RETENTION_SECONDS=60, OUTBOX_PURGE_INTERVAL_SECONDS=7)
    draining = iter([True, False])
    asyncio.run(housekeeping.purge_loop(s, DownPool(), lambda: len(pauses) >= 2, lambda: next(draining)))
    assert pauses == [1.0, 7]
    line = caplog.records[-1]
    assert line.getMessage() == "retention purge failed: OSError: database away" and line.event == "purge failed"


class NotifiedListener:
    """A LISTEN connection under enqueue load: a notification within every wait, after `step` s."""

    def __init__(self, clock: list[float], step: float):
        self.clock, self.step, self.waits = clock, step, 0

    async def wait(self, timeout: float) -> bool:
        self.waits += 1
        self.clock[0] += min(self.step, timeout)
        return True


def test_the_back_off_after_a_failed_tick_holds_under_notifications(monkeypatch):
    w = make_worker()
    now = [100.0]
    monkeypatch.setattr(loop_module.time, "monotonic", lambda: now[0])
    w.listener = NotifiedListener(now, step=0.01)
    asyncio.run(w.wait_for_work(0.5, notified_ends=False))
    assert now[0] >= 100.5 and w.listener.waits == 50  # every notification, and the whole back-off
    w.shards_changed = True
    now[0] = 100.0
    asyncio.run(w.wait_for_work(0.5, notified_ends=False))
    assert now[0] >= 100.5 and w.shards_changed  # new shards wait for the next idle wait too


def test_an_idle_wait_ends_at_the_first_notification(monkeypatch):
    w = make_worker()
    now = [100.0]
    monkeypatch.setattr(loop_module.time, "monotonic", lambda: now[0])
    w.listener = NotifiedListener(now, step=0.01)
    asyncio.run(w.wait_for_work(2.0))
    assert w.listener.waits == 1


def test_a_busy_worker_takes_in_a_rescan_notice_before_its_next_claim():
    # A worker that never idles never waited on its LISTEN connection: a row reset to pending
    # behind its cursor (the reaper's or a requeue's NOTIFY) must still rewind the scan before
    # the next claim, not at the periodic full rescan.
    from kaireon_pub.worker.wake import CHANNEL_RESCAN, CHANNEL_WORK
    from tests.unit.worker_fakes import FakeListenConn

    w = make_worker()
    conn = FakeListenConn()

    async def connect():
        return conn

    w.listener.connect = connect

    async def tick_with(arrived):
        conn.arrived = list(arrived)
        w.scan.cursors = {3: (10, 5)}
        await w.tick.run_once()  # owns no shard: the tick stops right after the rescans

    async def scenario():
        await tick_with([])
        assert conn.listening == [f"LISTEN {CHANNEL_WORK}", f"LISTEN {CHANNEL_RESCAN}"]
        assert w.scan.cursors == {}, "what was notified before anything listened is looked at once"
        await tick_with([CHANNEL_WORK, CHANNEL_WORK])
        assert w.scan.cursors == {3: (10, 5)}, "a work notice rewinds nothing"
        await tick_with([CHANNEL_WORK, CHANNEL_RESCAN])
        assert w.scan.cursors == {}, "the rescan notice reached the scan before the claim"
        assert conn.read_timeouts == [0, 0, 0]  # read without waiting, once per tick
        assert len(conn.listening) == 2  # one connection, kept

    asyncio.run(scenario())


def test_a_lost_listen_connection_does_not_fail_the_tick_and_is_tried_again_after_a_pause():
    import psycopg

    from kaireon_pub.worker import wake
    from tests.unit.worker_fakes import Clock, FakeListenConn

    clock, rescans, attempts = Clock(), [], []
    conn = FakeListenConn([wake.CHANNEL_RESCAN])

    async def connect():
        attempts.append(clock.now)
        if len(attempts) == 1:
            raise psycopg.OperationalError("database away")
        return conn

    listener = wake.Listener(connect, lambda: rescans.append(clock.now), clock=clock)

    async def scenario():
        await listener.take_notices()  # fails: the tick goes on
        clock.now += wake.RECONNECT_PAUSE_S - 0.1
        await listener.take_notices()  # not tried again yet
        assert attempts == [1000.0] and rescans == []
        clock.now += 0.1
        await listener.take_notices()
        # Connected: notices sent meanwhile were lost (one rescan), then the arrived one.
        assert len(attempts) == 2 and len(rescans) == 2 and listener.conn is conn

    asyncio.run(scenario())
