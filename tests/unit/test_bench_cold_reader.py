"""bench/cold.py's topic reader against a broker that answers a fetch from a later batch.

Tansu (memory storage) advances a partition's high watermark before it stores the batch it
reserved the offsets for; a fetch in between, once a later batch of another producer is stored,
is answered from that later batch. A consumer that trusts the answer never reads the earlier
batch, though it is on the topic: the cold scenario's reader once stopped 84 ids short that way
(one producer batch of one partition). The reader must notice the jump and read the range again.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError

from bench import cold

TOPIC = "t"


class FakeError:
    def __init__(self, code: int, name: str):
        self._code, self._name = code, name

    def code(self) -> int:
        return self._code

    def name(self) -> str:
        return self._name

    def str(self) -> str:
        return self._name.lower()


class FakeMessage:
    def __init__(self, partition: int, offset: int, error: FakeError | None = None):
        self._p, self._o, self._e = partition, offset, error

    def error(self):
        return self._e

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def headers(self):
        return [("event-id", f"{self._p}-{self._o}".encode())]


class FakeConsumer:
    """One partition of `size` records. Offsets in `hidden` are reserved but not stored yet: a
    fetch that reaches them is answered from the next stored record (Tansu's answer) until
    `hidden` is emptied (the batch stored). Errors queued in `errors` come before the records."""

    instances: list[FakeConsumer] = []

    def __init__(self, config: dict):
        self.config = config
        self.position: dict[int, int] = {}
        self.size = 10
        self.hidden: set[int] = set()
        self.errors: list[FakeMessage] = []
        self.seeks: list[tuple[int, int]] = []
        self.closed = False
        FakeConsumer.instances.append(self)

    def assign(self, tps) -> None:
        for tp in tps:
            self.position[tp.partition] = tp.offset

    def seek(self, tp) -> None:
        self.seeks.append((tp.partition, tp.offset))
        self.position[tp.partition] = tp.offset

    def consume(self, n: int, timeout: float):
        time.sleep(0.001)
        out: list[FakeMessage] = list(self.errors)
        self.errors.clear()
        at = self.position[0]
        while at < self.size and at in self.hidden:
            at += 1  # the later batch answers the fetch
        stop = min(self.size, at + 3)
        for offset in range(at, stop):
            if offset in self.hidden:
                break
            out.append(FakeMessage(0, offset))
            self.position[0] = offset + 1
        if at >= self.size:
            out.append(FakeMessage(0, self.size, FakeError(KafkaError._PARTITION_EOF, "_PARTITION_EOF")))
        return out

    def get_watermark_offsets(self, tp, cached: bool = False):
        return (0, self.size)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch):
    FakeConsumer.instances.clear()
    monkeypatch.setattr(cold, "Consumer", FakeConsumer)
    return FakeConsumer


def run_reader(reader: cold.DistinctReader, until, timeout: float = 5) -> None:
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while not until() and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        reader.stop()


def test_a_batch_the_broker_answered_past_is_read_again(fake):
    said: list[str] = []
    reader = cold.DistinctReader("x:1", TOPIC, 1, 10, say=said.append)
    consumer = fake.instances[0]
    consumer.hidden = {4, 5, 6}  # reserved by one producer, not stored yet; 7.. stored by another

    def store_once_skipped() -> bool:
        if reader.gaps and consumer.hidden:
            consumer.hidden.clear()  # the earlier batch is stored now
        return reader.done.is_set()

    run_reader(reader, store_once_skipped)

    assert reader.done.is_set(), said
    assert len(reader.ids) == 10
    assert reader.gaps == [(0, 4, 7)]
    assert reader.holes == []
    assert (0, 4) in consumer.seeks
    assert any("asked for offset 4, the broker answered from 7" in line for line in said), said
    assert any("gap filled" in line for line in said), said
    assert reader.ends == {0: (10, 10)}
    assert consumer.config["auto.offset.reset"] == "error"  # Tansu's "earliest" is not offset 0
    assert consumer.closed


def test_a_gap_no_reread_fills_is_reported_as_a_hole(fake, monkeypatch):
    monkeypatch.setattr(cold.DistinctReader, "GAP_GIVE_UP_S", 0.2)
    monkeypatch.setattr(cold.DistinctReader, "GAP_RETRY_S", 0.02)
    said: list[str] = []
    reader = cold.DistinctReader("x:1", TOPIC, 1, 10, say=said.append)
    fake.instances[0].hidden = {4, 5, 6}  # never stored

    run_reader(reader, lambda: bool(reader.holes), timeout=3)

    assert reader.holes == [(0, 4, 7)]
    assert len(fake.instances[0].seeks) >= 2  # read again more than once before giving up
    assert not reader.done.is_set()
    assert any("left as a hole" in line for line in said), said
    # The summary at the end names what went wrong.
    assert any("7 of 10 distinct ids" in line and "left as holes: 1" in line for line in said), said


def test_errors_are_reported_not_skipped(fake):
    said: list[str] = []
    reader = cold.DistinctReader("x:1", TOPIC, 1, 10, say=said.append)
    consumer = fake.instances[0]
    consumer.errors = [FakeMessage(0, -1, FakeError(KafkaError.UNKNOWN_TOPIC_OR_PART, "UNKNOWN_TOPIC_OR_PART"))] * 2

    run_reader(reader, reader.done.is_set)

    assert reader.done.is_set()
    assert reader.errors == {"UNKNOWN_TOPIC_OR_PART (partition 0)": 2}
    assert sum("UNKNOWN_TOPIC_OR_PART" in line for line in said) == 2  # once when seen, once in the summary


def test_a_reader_stopped_short_says_which_partitions_are_below_their_high_watermark(fake):
    said: list[str] = []
    reader = cold.DistinctReader("x:1", TOPIC, 1, 10, say=said.append)
    fake.instances[0].size = 10
    fake.instances[0].hidden = set(range(6, 10))  # reserved, never stored: the reader waits at 6

    run_reader(reader, lambda: len(reader.ids) >= 6)

    assert reader.ends == {0: (6, 10)}
    assert any("p0 at 6 of 10" in line for line in said), said
