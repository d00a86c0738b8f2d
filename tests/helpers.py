"""Helpers the tests share: environments for the tier, reading topics, waiting on conditions."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition


class TierPooler:
    """The PgBouncer (pool_mode=transaction) the tiers of the e2e tests connect through under
    KAIREON_TEST_VIA_PGBOUNCER=1: tests/conftest.py installs one per test as `TIER_POOLER`."""

    def __init__(self, port: int, upstream_url: str):
        self.port = port
        self._upstream = _server_of(upstream_url)

    def route(self, db_url: str) -> dict[str, str]:
        """The tier's settings for a database of the test server: DATABASE_URL through PgBouncer,
        OUTBOX_POOL_MODE=transaction, LISTEN (and `migrate`) on the direct URL (README, "Through
        PgBouncer"). Empty for any other URL (a server of the test's own, a proxy, a bad URL)."""
        if _server_of(db_url) != self._upstream:
            return {}
        pooled = psycopg.conninfo.make_conninfo(db_url, host="127.0.0.1", port=str(self.port))
        return {"DATABASE_URL": pooled, "OUTBOX_POOL_MODE": "transaction", "OUTBOX_LISTEN_DATABASE_URL": db_url}


def _server_of(url: str) -> tuple[str, str] | None:
    try:
        info = psycopg.conninfo.conninfo_to_dict(url) if url else None
    except psycopg.ProgrammingError:
        return None
    if not info:
        return None
    return str(info.get("host") or ""), str(info.get("port") or "5432")


TIER_POOLER: TierPooler | None = None


def pooled(db_url: str) -> dict[str, str]:
    """What `tier_env` sets for `db_url` under TIER_POOLER (empty when the tiers connect directly)."""
    return TIER_POOLER.route(db_url) if TIER_POOLER is not None else {}


def tier_env(db_url: str, bootstrap: str, tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The environment of a `kaireon-pub` process of the tests. The test's own connections use
    `db_url` as given; under TIER_POOLER the tier reaches the same database through PgBouncer."""
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
    env.update(pooled(db_url))
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


MAX_REREADS = 200  # per partition: a gap that reading again never fills is taken as it is


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
        self._next: dict[int, int] = {}  # partition -> the next offset to read
        self._rereads: dict[int, int] = {}

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
            self._take(self.consumer.consume(1000, timeout=0.2))
        return self.messages

    def _take(self, batch: list[Any]) -> None:
        """Keeps each partition's records in offset order, each once. Tansu may answer a fetch
        from a later batch while an earlier one it has acknowledged is not stored yet (its memory
        storage moves the high watermark first): the skipped range is read again, not lost."""
        rewound: set[int] = set()
        for msg in batch:
            if msg.error() is not None:
                continue
            partition, offset = msg.partition(), msg.offset()
            if partition in rewound:
                continue  # read again from the gap
            expected = self._next.get(partition, 0)
            if offset > expected and self._rereads.get(partition, 0) < MAX_REREADS:
                self._rereads[partition] = self._rereads.get(partition, 0) + 1
                self.consumer.seek(TopicPartition(self.topic, partition, expected))
                rewound.add(partition)
                continue
            if offset < expected:
                continue  # already read
            self._next[partition] = offset + 1
            self.messages.append(msg)

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


class Tier:
    """`kaireon-pub run` as a real process; its JSON log lines go to a file the test can read."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kaireon_pub", "run"], env=env,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((line for line in self.logs() if predicate(line)), None)
        return wait_for(find, timeout, what)

    def http_port(self, timeout: float = 30) -> int:
        line = self.wait_log(lambda e: e.get("event") == "http listening", timeout, "the http server")
        return int(line["port"])

    def worker_pids(self) -> dict[int, int]:
        """slot -> pid of the live worker, from the supervisor's spawn/exit lines."""
        live: dict[int, int] = {}
        for line in self.logs():
            if line.get("event") == "worker spawned":
                live[line["slot"]] = line["workerPid"]
        return live

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        else:
            # Workers die with their supervisor; make sure no orphan outlives the test.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def metric_value(port: int, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample of a metric from the tier's /metrics, or None when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total = (total or 0.0) + sample.value
    return total


class Load:
    """Commits events from a background thread until stopped; remembers every committed id."""

    def __init__(self, db_url: str, topic: str, *, per_tx: int = 20, pause: float = 0.01, keys: int = 50):
        self.db_url, self.topic, self.per_tx, self.pause, self.keys = db_url, topic, per_tx, pause, keys
        self.committed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from kaireon_pub import Event, enqueue_many

        n = 0
        try:
            with psycopg.connect(self.db_url) as conn:
                while not self._stop.is_set():
                    events = [Event(self.topic, f"key-{(n + i) % self.keys}", {"n": n + i}) for i in range(self.per_tx)]
                    ids = enqueue_many(conn, events)
                    conn.commit()
                    self.committed.extend(ids)
                    n += self.per_tx
                    self._stop.wait(self.pause)
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.error = exc

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(30)
        if self.error:
            raise self.error
        return self.committed


def assert_per_key_order(messages: list[Any]) -> None:
    """Within each key, first deliveries appear in commit (id) order; duplicates may follow."""
    seen: set[int] = set()
    last: dict[bytes, int] = {}
    for msg in messages:
        event_id = int(dict(msg.headers())["event-id"])
        if event_id in seen:
            continue
        seen.add(event_id)
        key = msg.key()
        assert event_id > last.get(key, -1), f"key {key!r}: event {event_id} after {last[key]}"
        last[key] = event_id


def preload(db_url: str, topic: str, n: int, keys: int = 1000) -> None:
    """A backlog of n events in one transaction, fast (enqueue_many in chunks)."""
    from kaireon_pub import Event, enqueue_many

    with psycopg.connect(db_url) as conn:
        for start in range(0, n, 5000):
            enqueue_many(conn, [Event(topic, f"agg-{i % keys}", {"i": i, "pad": "x" * 200})
                                for i in range(start, min(n, start + 5000))])
        conn.commit()
