"""The tests' harness: environments for the tier, starting it, waiting for its workers to share
the shards, enqueueing, reading topics back, waiting on conditions.

The tier process, its environment, `wait_for` and the one definition of a balanced share live in
`kaireon_pub.devtier` (the bench uses them too) and are re-exported here. The e2e fixtures built on
these (`start_tier`, `topic_reader`) are in tests/e2e/conftest.py.
"""

from __future__ import annotations

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

from kaireon_pub import devtier
from kaireon_pub.devtier import (  # noqa: F401 - re-exported: the tests import them from here
    SHARDS,
    Tier,
    is_balanced,
    shard_shares,
    wait_balanced,
    wait_for,
)


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
    return devtier.tier_env(db_url, bootstrap, tmp_path, **{
        "OUTBOX_POLL_INTERVAL_MS": "200", "OUTBOX_WORKERS": "1", **pooled(db_url), **overrides})


def status_counts(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM outbox_events GROUP BY status").fetchall())


def row_summary(db_url: str) -> dict[str, object]:
    """The rows by status, how many were retried, and a few of their errors (for a failure message)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        retried = conn.execute("SELECT count(*), max(attempts) FROM outbox_events WHERE attempts > 0").fetchone()
        errors = conn.execute(
            "SELECT DISTINCT left(last_error, 160) FROM outbox_events WHERE last_error IS NOT NULL LIMIT 5").fetchall()
    return {"status": status_counts(db_url), "withAttempts": retried[0], "maxAttempts": retried[1],
            "errors": [e[0] for e in errors]}


def wait_all_published(db_url: str, n: int, timeout: float, what: str) -> None:
    """Every row of the outbox published, and `n` of them; the rows summed up on a timeout."""
    try:
        wait_for(lambda: status_counts(db_url) == {"published": n}, timeout, what, interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; rows: {row_summary(db_url)}") from None


def commit_events(db_url: str, topic: str, n: int, *, keys: int, phase: str, key_prefix: str = "k") -> list[int]:
    """Enqueue `n` events ({"phase", "i"}) on `keys` keys round robin in one transaction; their ids."""
    from kaireon_pub import Event, enqueue_many

    with psycopg.connect(db_url) as conn:
        ids = enqueue_many(conn, [Event(topic, f"{key_prefix}{i % keys}", {"phase": phase, "i": i}) for i in range(n)])
        conn.commit()
    return ids


def commit(db_url: str, events: list[Any]) -> list[int]:
    """The events (kaireon_pub.Event) enqueued in one transaction, committed; their ids, in order."""
    from kaireon_pub import enqueue_many

    with psycopg.connect(db_url) as conn:
        ids = enqueue_many(conn, events)
        conn.commit()
    return ids


MAX_REREADS = 200  # per partition: a gap that reading again never fills is taken as it is


class TopicReader:
    """Reads a topic from the beginning of every partition (assign(), no group join). In the e2e
    tests, take one from the `topic_reader` fixture, which closes it; elsewhere, `with`."""

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
        self._closed = False

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

    def read_ids(self, ids: list[int], timeout: float, extra: float = 0.0) -> list[Any]:
        """Read until every one of `ids` is there, naming the missing ones on a timeout; then `extra`
        s more (late duplicates). Every message read so far, in the order read."""
        wanted = set(ids)
        try:
            messages = self.read_until(lambda msgs: wanted <= set(event_ids(msgs)), timeout)
        except AssertionError as exc:
            missing = sorted(wanted - set(event_ids(self.messages)))
            raise AssertionError(
                f"{exc}; {len(missing)} of {len(wanted)} events missing, e.g. {missing[:10]}") from None
        if extra:
            until = time.monotonic() + extra
            messages = self.read_until(lambda _msgs: time.monotonic() >= until, extra + 10)
        return list(messages)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def event_ids(messages: list[Any]) -> list[int]:
    return [int(dict(m.headers())["event-id"]) for m in messages]


def run_cli(*args: str, env: dict[str, str], timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kaireon_pub", *args],
        env=env, capture_output=True, text=True, timeout=timeout, input=input,
    )


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


def create_led_topic(admin: Any, name: str, partitions: int, **config: str) -> str:
    """A topic of `partitions`, replicated as widely as the broker allows (up to 3), once every
    partition has a leader (a produce before that may fail)."""
    from confluent_kafka.admin import NewTopic

    replication = min(3, len(admin.list_topics(timeout=10).brokers))
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=replication,
                                  config=config)])[name].result(30)

    def led() -> bool:
        meta = admin.list_topics(name, timeout=5).topics.get(name)
        return (meta is not None and meta.error is None and len(meta.partitions) == partitions
                and all(p.leader >= 0 for p in meta.partitions.values()))
    wait_for(led, 30, f"{name} led")
    return name
