"""Helpers the tests share: environments for the tier, reading topics, waiting on conditions."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition


def tier_env(db_url: str, bootstrap: str, tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "KAFKA_"))}
    env.update(
        DATABASE_URL=db_url,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        OUTBOX_POLL_INTERVAL_MS="200",
        OUTBOX_WORKERS="1",
        OUTBOX_LIVENESS_FILE=str(tmp_path / "alive"),
        OUTBOX_HTTP_PORT="0",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns a truthy value; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def status_counts(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM outbox_events GROUP BY status").fetchall())


class TopicReader:
    """Reads a topic from the beginning of every partition (assign(), no group join)."""

    def __init__(self, bootstrap: str, topic: str):
        self.topic = topic
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{topic}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "topic.metadata.refresh.interval.ms": 1000,
        })
        self.messages: list[Any] = []
        self._assigned: set[int] = set()

    def _assign(self) -> None:
        md = self.consumer.list_topics(self.topic, timeout=5)
        meta = md.topics.get(self.topic)
        if meta is None or meta.error is not None:
            return
        parts = set(meta.partitions)
        if parts != self._assigned:
            self.consumer.assign([TopicPartition(self.topic, p, 0) for p in sorted(parts)])
            self._assigned = parts

    def read_until(self, predicate: Callable[[list[Any]], bool], timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout} s reading {self.topic}: {len(self.messages)} messages"
                )
            if not self._assigned:
                self._assign()
                if not self._assigned:
                    time.sleep(0.1)
                    continue
            for msg in self.consumer.consume(1000, timeout=0.2):
                if msg.error() is None:
                    self.messages.append(msg)
        return self.messages

    def read_count(self, n: int, timeout: float) -> list[Any]:
        return self.read_until(lambda msgs: len(msgs) >= n, timeout)

    def close(self) -> None:
        self.consumer.close()


def event_ids(messages: list[Any]) -> list[int]:
    return [int(dict(m.headers())["event-id"]) for m in messages]


def run_cli(*args: str, env: dict[str, str], timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kaireon_pub", *args],
        env=env, capture_output=True, text=True, timeout=timeout, input=input,
    )


def start_tier(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kaireon_pub", "run", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
