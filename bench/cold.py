"""The cold start: the tier spawned against a backlog already in the table, beside a warm drain.

Both are timed the same way, by a consumer reading the topic and counting distinct `event-id`
headers (a duplicate never counts twice):
- cold: from the spawn of `kaireon-pub run` (the backlog committed before) to the last event;
  the first event on the topic gives the time to the first publish (an upper bound: it includes
  the broker's fetch path), and the tier's log lines give the steps of its boot;
- warm: a tier started and balanced first, then the backlog committed at once: from that commit
  to the last event.
The reader costs the shared cores about 0.003 CPU-s per 1,000 events in both, so the ratio
cold / warm compares like with like (the `drain` scenario's figure uses the tier's counter instead).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, TopicPartition

# Boot steps, as the tier's own log lines name them: (label, event, role prefix, first or last).
BOOT_STEPS = (
    ("supervisor started (interpreter, imports, settings, producer check)", "supervisor started", "supervisor", min),
    ("last worker started (fork, worker imports)", "worker started", "worker-", max),
    ("every worker holds its first shards (first lease round)", "rebalance", "worker-", max),
)


class DistinctReader(threading.Thread):
    """Reads the whole topic from offset 0; records when the first event arrived and when the
    count of distinct event ids reached the target."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, target: int):
        super().__init__(daemon=True)
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"bench-cold-{topic}", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10, "fetch.min.bytes": 1,
        })
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        self.target = target
        self.ids: set[bytes] = set()
        self.first: float | None = None
        self.last: float | None = None
        self.done = threading.Event()
        self.polling = threading.Event()  # set once the reader has polled the broker
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                msgs = self.consumer.consume(5000, timeout=0.05)
                self.polling.set()
                for msg in msgs:
                    if msg.error() is not None:
                        continue
                    if self.first is None:
                        self.first = time.monotonic()
                    for name, value in msg.headers() or ():
                        if name == "event-id":
                            self.ids.add(value)
                            break
                if len(self.ids) >= self.target and not self.done.is_set():
                    self.last = time.monotonic()
                    self.done.set()
        finally:
            self.consumer.close()

    def wait_ready(self, timeout: float = 15) -> None:
        if not self.polling.wait(timeout):
            raise RuntimeError("the topic reader did not start")
        time.sleep(0.3)  # its fetch sessions to every partition leader are set up by now

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def recount(bootstrap: str, topic: str, partitions: int, timeout: float = 60) -> int:
    """Distinct event ids on the topic, read again from the start by a new consumer (untimed: when
    the reader fell short, this tells a reader that missed records from records not on the topic)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-recount-{topic}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    ids: set[bytes] = set()
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(at_end) < partitions and time.monotonic() < deadline:
            for msg in consumer.consume(5000, timeout=0.2):
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(msg.partition())
                    continue
                at_end.discard(msg.partition())
                for name, value in msg.headers() or ():
                    if name == "event-id":
                        ids.add(value)
                        break
    finally:
        consumer.close()
    return len(ids)


@dataclass
class Run:
    kind: str  # "cold" or "warm"
    events: int
    seconds: float | None  # spawn (cold) or commit (warm) → last distinct event on the topic
    counter_seconds: float | None  # same origin → the tier's published counter reaching the backlog
    first_event: float | None  # same origin → first event on the topic
    boot: dict[str, float]  # cold only: boot step → seconds after the spawn
    seen: int = 0  # distinct event ids the reader saw by the end
    recounted: int | None = None  # distinct ids a second reader found, when the first fell short

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def counter_rate(self) -> float:
        return self.events / self.counter_seconds if self.counter_seconds else 0.0


def boot_steps(log_paths: list[Path], spawn_wall: float) -> dict[str, float]:
    """Seconds after the spawn of each boot step, read from the tier's JSON log lines."""
    lines = []
    for path in log_paths:
        for raw in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
    out: dict[str, float] = {}
    for label, event, role, pick in BOOT_STEPS:
        times = []
        seen_roles = set()
        for line in lines:
            if line.get("event") == event and str(line.get("role", "")).startswith(role):
                if pick is max and line["role"] in seen_roles:
                    continue  # the first such line of each worker
                seen_roles.add(line["role"])
                times.append(datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp() - spawn_wall)
        if times:
            out[label] = pick(times)
    return out
