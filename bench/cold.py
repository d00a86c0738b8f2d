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

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

# Boot steps, as the tier's own log lines name them: (label, event, role prefix, first or last).
BOOT_STEPS = (
    ("supervisor started (interpreter, imports, settings, producer check)", "supervisor started", "supervisor", min),
    ("last worker started (fork, worker imports)", "worker started", "worker-", max),
    ("every worker holds its first shards (first lease round)", "rebalance", "worker-", max),
)


class DistinctReader(threading.Thread):
    """Reads the whole topic from offset 0; records when the first event arrived and when the
    count of distinct event ids reached the target.

    It follows every partition's offsets. Tansu (memory storage) advances a partition's high
    watermark before it stores the batch it reserved the offsets for: a fetch in between, after a
    later batch (another producer's) was stored, is answered from that later batch, and a consumer
    that trusts the answer skips the earlier one for good, though it is on the topic. So an answer
    that starts past the offset asked for is a gap: the reader says so and reads the partition
    again from the offset it asked for. Errors are reported, not skipped; at the end the reader
    says which partitions it left below their high watermark (as its fetches last reported it)."""

    GAP_RETRY_S = 0.05  # a gap still open this long after the last re-read: read it again
    GAP_GIVE_UP_S = 10.0  # a gap no re-read fills in this long: a real hole, reported and left

    def __init__(self, bootstrap: str, topic: str, partitions: int, target: int, say=print):
        super().__init__(daemon=True)
        self.topic = topic
        self.partitions = partitions
        self.say = say
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"bench-cold-{topic}", "enable.auto.commit": False,
            # No silent reset: Tansu's "earliest" is the batch stored first, not offset 0.
            "auto.offset.reset": "error", "enable.partition.eof": True,
            "fetch.wait.max.ms": 10, "fetch.min.bytes": 1,
        })
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        self.target = target
        self.ids: set[bytes] = set()
        self.first: float | None = None
        self.last: float | None = None
        self.done = threading.Event()
        self.polling = threading.Event()  # set once the reader has polled the broker
        self._halt = threading.Event()
        self.next = dict.fromkeys(range(partitions), 0)  # per partition: the next offset to read
        self.gaps: list[tuple[int, int, int]] = []  # (partition, offset asked, offset answered)
        self.holes: list[tuple[int, int, int]] = []  # gaps no re-read filled: (partition, from, to)
        self.errors: dict[str, int] = {}
        self.ends: dict[int, tuple[int, int]] = {}  # at the end: partition -> (next offset, high watermark)
        # Gaps being read again: partition -> (offset asked, offset answered, first seen, last seek).
        self._reread: dict[int, tuple[int, int, float, float]] = {}

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                msgs = self.consumer.consume(5000, timeout=0.05)
                self.polling.set()
                for msg in msgs:
                    if msg.error() is not None:
                        self._error(msg)
                        continue
                    self._position(msg.partition(), msg.offset())
                    if self.first is None:
                        self.first = time.monotonic()
                    for name, value in msg.headers() or ():
                        if name == "event-id":
                            self.ids.add(value)
                            break
                if self._reread:
                    self._check_rereads()
                if len(self.ids) >= self.target and not self.done.is_set():
                    self.last = time.monotonic()
                    self.done.set()
        finally:
            self._finish()
            self.consumer.close()

    def _position(self, p: int, offset: int) -> None:
        """Moves the partition's position; an answer past it is a gap, read again."""
        expected = self.next[p]
        if offset == expected:
            self.next[p] = offset + 1
            if p in self._reread and self._reread[p][0] == expected:
                del self._reread[p]
                self.say(f"    reader: partition {p}: offsets {expected:,}.. read on a second look (gap filled)")
            return
        if offset < expected or p in self._reread:
            return  # read again after a seek back, or past a gap being read again: counted, position kept
        now = time.monotonic()
        self.gaps.append((p, expected, offset))
        self.say(f"    !! reader: partition {p}: asked for offset {expected:,}, the broker answered from"
                 f" {offset:,} ({offset - expected:,} records skipped); reading them again")
        self._reread[p] = (expected, offset, now, now)
        self._seek(p, expected)

    def _check_rereads(self) -> None:
        """A gap still open: ask again every GAP_RETRY_S (the answer past it moved the consumer on);
        after GAP_GIVE_UP_S it is a hole, reported, and the partition is read on past it."""
        now = time.monotonic()
        for p, (expected, answered, first, last_seek) in list(self._reread.items()):
            if now - first > self.GAP_GIVE_UP_S:
                del self._reread[p]
                self.holes.append((p, expected, answered))
                self.say(f"    !! reader: partition {p}: offsets {expected:,}–{answered - 1:,} never came in"
                         f" {self.GAP_GIVE_UP_S:.0f} s of re-reads; left as a hole")
                self.next[p] = answered
                self._seek(p, answered)
            elif now - last_seek > self.GAP_RETRY_S:
                self._reread[p] = (expected, answered, first, now)
                self._seek(p, expected)

    def _seek(self, p: int, offset: int) -> None:
        try:
            self.consumer.seek(TopicPartition(self.topic, p, offset))
        except KafkaException as exc:
            self._count(f"seek: {exc}")

    def _error(self, msg) -> None:
        err = msg.error()
        if err.code() == KafkaError._PARTITION_EOF:
            return
        name = f"{err.name()} (partition {msg.partition()})" if msg.partition() is not None else err.name()
        if self._count(name) == 1:
            self.say(f"    !! reader: {name}: {err.str()}")
        if err.code() == KafkaError._AUTO_OFFSET_RESET and msg.partition() is not None:
            self._seek(msg.partition(), self.next[msg.partition()])  # out of range: ask again where we are

    def _count(self, name: str) -> int:
        self.errors[name] = self.errors.get(name, 0) + 1
        return self.errors[name]

    def _finish(self) -> None:
        """Each partition's position against the high watermark of its last fetch; said when the
        reader fell short, or when anything went wrong on the way."""
        for p in range(self.partitions):
            with contextlib.suppress(KafkaException):
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
                self.ends[p] = (self.next[p], high)
        behind = {p: e for p, e in self.ends.items() if e[1] >= 0 and e[0] < e[1]}
        if behind or self.holes or self.errors or not self.done.is_set():
            below = ", ".join(f"p{p} at {at:,} of {high:,}" for p, (at, high) in sorted(behind.items())) or "none"
            self.say(f"    reader: {len(self.ids):,} of {self.target:,} distinct ids; partitions below their high"
                     f" watermark: {below}; gaps in the broker's answers: {len(self.gaps)}, left as holes:"
                     f" {len(self.holes)}; errors: {', '.join(f'{k} × {v}' for k, v in self.errors.items()) or 'none'}")

    def wait_ready(self, timeout: float = 15) -> None:
        if not self.polling.wait(timeout):
            raise RuntimeError("the topic reader did not start")
        time.sleep(0.3)  # its fetch sessions to every partition leader are set up by now

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def recount(bootstrap: str, topic: str, partitions: int, timeout: float = 60, say=print) -> int:
    """Distinct event ids on the topic, read again from offset 0 by a new consumer until every
    partition is at its end (untimed: when the reader fell short, this tells a reader that missed
    records from records not on the topic). Says what it found wrong: errors, offsets missing
    below a partition's end, partitions it did not read to the end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-recount-{topic}",
                         "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "error"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    ids: set[bytes] = set()
    offsets: dict[int, set[int]] = {p: set() for p in range(partitions)}
    at_end: dict[int, int] = {}  # partition -> its end (the offset of the EOF)
    errors: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(at_end) < partitions and time.monotonic() < deadline:
            for msg in consumer.consume(5000, timeout=0.2):
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        at_end[msg.partition()] = msg.offset()
                    else:
                        errors[msg.error().name()] = errors.get(msg.error().name(), 0) + 1
                    continue
                at_end.pop(msg.partition(), None)
                offsets[msg.partition()].add(msg.offset())
                for name, value in msg.headers() or ():
                    if name == "event-id":
                        ids.add(value)
                        break
    finally:
        consumer.close()
    missing = {p: end - len(offsets[p]) for p, end in at_end.items() if len(offsets[p]) != end}
    unread = sorted(set(range(partitions)) - set(at_end))
    if missing or unread or errors:
        say(f"    recount: offsets missing below the end: {missing or 'none'}; partitions not read to the end"
            f" in {timeout:.0f} s: {unread or 'none'}; errors: {errors or 'none'}")
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
