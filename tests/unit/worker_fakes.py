"""Small stand-ins for the worker's unit tests (tests/unit/test_worker_*.py): settings without the
environment, a clock the test moves, a producer's health flags, a claim's tuples."""

from __future__ import annotations

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
