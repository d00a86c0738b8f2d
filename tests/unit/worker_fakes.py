"""Small stand-ins for the worker's unit tests (tests/unit/test_worker_*.py): settings without the
environment, a clock the test moves, a producer's health flags, a claim's tuples."""

from __future__ import annotations

from types import SimpleNamespace

from kaireon_pub.settings import Settings
from kaireon_pub.worker.scan import ShardScan

ENV = {"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}


def settings(**env) -> Settings:
    return Settings.from_env({**ENV, **{k: str(v) for k, v in env.items()}})


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakePublisher:
    """The publisher as the worker's health checks see it: broken, why, and who marked it."""

    def __init__(self, cluster_ids=()):
        self.broken: str | None = None
        self.broken_cause: str | None = None
        self.refusal: str | None = None
        self.refusal_at = 0.0
        self.settings = SimpleNamespace(message_timeout_ms=10_000)
        self.recreated = 0
        self.cluster_ids = list(cluster_ids)

    def mark_broken(self, reason: str, cause: str) -> None:
        if self.broken is None:
            self.broken, self.broken_cause = reason, cause

    async def recreate(self) -> None:
        self.recreated += 1
        self.broken = self.broken_cause = None

    def fetch_cluster_id(self, timeout: float) -> str | None:
        answer = self.cluster_ids.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def scan(clock: Clock, *, strict: bool = True, batch_size: int = 100, rescan_interval_s: float = 30.0) -> ShardScan:
    return ShardScan(strict=strict, batch_size=batch_size, rescan_interval_s=rescan_interval_s, clock=clock)


def raw(event_id: int, shard: int, xid: int, *, topic: str | None = "t", key: str | None = "k",
        attempts: int | None = 0) -> tuple:
    """A claim's tuple: a Row's columns in order (a held row has no topic; a busy one keeps its attempts)."""
    return (event_id, topic, key, b"v", "{}", None, attempts, shard, xid, 0.0, "", "{}", None)


def value(metric) -> float:
    return metric._value.get()


class LeaseTable:
    """outbox_shard_leases and outbox_workers as the lease keeper's rounds see them: who owns each
    shard, how many workers are live, and every statement a keeper sent besides the lease SQL."""

    def __init__(self, live: int, shards: int = 256):
        self.owner: dict[int, object] = dict.fromkeys(range(shards))
        self.live = live
        self.locked: set[int] = set()  # free shards whose rows another session holds (SKIP LOCKED)
        self.sent: list[str] = []


class FakeCursor:
    def __init__(self, rows=(), rowcount: int = 0):
        self.rows, self.rowcount = list(rows), rowcount

    async def fetchall(self):
        return self.rows

    async def fetchone(self):
        return self.rows[0] if self.rows else None


class FakeLeaseConn:
    closed = False

    def __init__(self, table: LeaseTable):
        self.table = table

    async def execute(self, statement, params=None):
        from kaireon_pub.db.queries import Q

        self.table.sent.append(statement)
        if statement == Q.lease_census:
            return FakeCursor([(self.table.live, sum(o is None for o in self.table.owner.values()))])
        return FakeCursor()

    async def close(self):
        pass


def fake_leases(table: LeaseTable, slot: int = 0):
    """A Leases whose SQL runs against `table` (renew, take free shards lowest first, release)."""
    import uuid

    from kaireon_pub.worker.leases import Leases, RebalanceResult

    class FakeLeases(Leases):
        async def renew(self, conn):
            self.counting_siblings_until = 0.0  # past the first lease period
            return RebalanceResult(live_workers=table.live)

        async def acquire(self, conn, n):
            free = sorted(s for s, o in table.owner.items() if o is None and s not in table.locked)[:n]
            for shard in free:
                table.owner[shard] = self.worker_id
                self.owned[shard] = 1
            return free, 0

        async def release(self, conn, shards):
            for shard in shards:
                table.owner[shard] = None
                self.owned.pop(shard, None)
            return sorted(shards)

    return FakeLeases(uuid.uuid4(), slot, ttl_seconds=10)


class FakeListenConn:
    """The LISTEN connection: what it was asked (LISTEN statements), notifications that have
    arrived (channel names), and the timeout of every read of them."""

    def __init__(self, arrived=()):
        self.closed = False
        self.listening: list[str] = []
        self.arrived = list(arrived)
        self.read_timeouts: list[float | None] = []

    async def execute(self, statement, params=None):
        self.listening.append(statement)

    async def notifies(self, *, timeout=None, stop_after=None):
        from types import SimpleNamespace as Note

        self.read_timeouts.append(timeout)
        while self.arrived:
            yield Note(channel=self.arrived.pop(0))

    async def close(self):
        self.closed = True
