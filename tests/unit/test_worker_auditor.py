"""The continuous auditor (kaireon_pub/worker/auditor.py) without services: its pace (N samples a
minute, spread evenly), what it counts and logs for each answer of the broker, and its reader
(made on first use, closed in its own thread after the read in flight)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading

import pytest

from kaireon_pub import metrics
from kaireon_pub.audit.broker import StoredRecord
from kaireon_pub.worker import auditor
from kaireon_pub.worker.kafka.records import record_headers, record_key
from kaireon_pub.worker.rows import Row
from tests.unit.worker_fakes import Clock, settings, value


def row(event_id: int, *, payload: bytes = b'{"n":1}', key: str = "k", shard: int = 3, topic: str = "orders") -> Row:
    return Row(event_id, topic, key, payload, "{}", None, 0, shard, 100 + event_id, 0.0,
               "2026-01-01T00:00:00.000000Z")


def record_of(r: Row, partition: int = 0, offset: int = 7, **change) -> StoredRecord:
    """The record the tier produces for `r`, at (partition, offset), with `change` applied."""
    fields = {"key": record_key(r), "value": r.payload, "headers": tuple(record_headers(r))}
    return StoredRecord("orders", partition, offset, **{**fields, **change})


class FakePool:
    """The worker's pool as the auditor uses it: one statement a pass; what it was sent."""

    def __init__(self, rows=(), error: Exception | None = None):
        self.rows = list(rows)
        self.error = error
        self.params: list[dict] = []

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float):
        pool = self

        class Conn:
            async def execute(self, sql, params):
                assert sql == auditor.A.audit_sample
                pool.params.append(params)
                if pool.error is not None:
                    raise pool.error

                class Cur:
                    async def fetchall(self):
                        return [tuple(r) + (p, o) for r, p, o in pool.rows[:params["n"]]]
                return Cur()
        yield Conn()


class FakeReader:
    """The broker as the auditor reads it: `records` by (partition, offset); `topics`: each topic's
    partitions (None: not on the broker); `compacted_topics`: whose cleanup.policy includes compact;
    `high`: every partition's high watermark."""

    def __init__(self, records: dict[tuple[int, int], StoredRecord | None] | None = None,
                 error: Exception | None = None, *, topics: dict[str, list[int] | None] | None = None,
                 compacted_topics: tuple[str, ...] = (), high: int = 1_000_000):
        self.records = records or {}
        self.error = error
        self.topics = {"orders": [0, 1, 2]} if topics is None else topics
        self.compacted_topics = compacted_topics
        self.high = high
        self.asked: list[tuple[str, str]] = []  # (what, topic): partitions, policy
        self.reads: list[tuple[str, int, int]] = []
        self.closed_in: str | None = None
        self.made_in = threading.current_thread().name

    def partitions(self, topic, timeout):
        assert timeout <= auditor.READ_TIMEOUT_S
        self.asked.append(("partitions", topic))
        return self.topics.get(topic)

    def compacted(self, topic, timeout):
        assert timeout <= auditor.READ_TIMEOUT_S
        self.asked.append(("policy", topic))
        return topic in self.compacted_topics

    def watermarks(self, topic, partition, timeout):
        assert timeout <= auditor.READ_TIMEOUT_S
        return 0, self.high

    def read_at(self, topic, partition, offset, timeout):
        assert timeout <= auditor.READ_TIMEOUT_S
        self.reads.append((topic, partition, offset))
        if self.error is not None:
            raise self.error
        return self.records.get((partition, offset))

    def close(self):
        self.closed_in = threading.current_thread().name


def make(per_minute: int, pool: FakePool, reader: FakeReader | None = None, *, owned=(1, 2, 3), clock=None,
         **env) -> tuple[auditor.Auditor, list[FakeReader]]:
    made: list[FakeReader] = []

    def factory():
        made.append(reader or FakeReader())
        made[-1].made_in = threading.current_thread().name
        return made[-1]
    s = settings(OUTBOX_AUDIT_SAMPLE_PER_MINUTE=per_minute, **env)
    return auditor.Auditor(s, pool, lambda: owned, reader_factory=factory, clock=clock or Clock(),
                           rand=lambda: 0.25), made


def counts() -> dict[str, float]:
    return {"checked": value(metrics.AUDIT_CHECKED), "errors": value(metrics.AUDIT_ERRORS),
            **{k: value(metrics.AUDIT_FINDINGS.labels(k)) for k in auditor.KINDS}}


def delta(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in counts().items() if v != before[k]}


# ---- the pace ----------------------------------------------------------------------------------


@pytest.mark.parametrize("per_minute", [1, 7, 59, 600, 601, 1000, 6000])
def test_a_minute_of_passes_samples_n_rows_spread_evenly(per_minute):
    """N a minute: a pass every 60/N s (100 ms at the fastest), each taking its share, so that a
    minute of passes asks for N rows in all, never more than ceil(N / 600) + 1 in one pass."""
    rows = [(row(i), 0, i) for i in range(1, 20)]
    pool = FakePool(rows)
    audit, _ = make(per_minute, pool, FakeReader({(0, i): record_of(r, 0, i) for r, _, i in rows}))
    assert audit.interval == pytest.approx(60 / min(per_minute, 600))
    passes = round(60 / audit.interval)

    async def minute():
        for _ in range(passes):
            pause = await audit.once()
            assert 0 <= pause <= audit.interval
        audit.close()
    asyncio.run(minute())
    wanted = [p["n"] for p in pool.params]
    assert sum(wanted) == pytest.approx(per_minute, abs=1)
    assert max(wanted) <= math.ceil(per_minute / 600) + 1
    assert 0 <= audit.first_pause <= audit.interval


def test_the_statement_walks_a_bounded_stretch_sized_by_the_workers_share():
    assert auditor.scan_size(1, 256) == auditor.SCAN_SLACK
    assert auditor.scan_size(1, 16) == 16 * auditor.SCAN_SLACK
    assert auditor.scan_size(10, 1) == auditor.SCAN_MAX
    pool = FakePool()
    audit, _ = make(600, pool, owned=(5, 9), OUTBOX_RETENTION_SECONDS=600)
    asyncio.run(audit.once())
    (params,) = pool.params
    assert params["shards"] == "{5,9}" and params["window"] == 600 and params["at"] == 0.25
    assert params["scan"] == auditor.scan_size(1, 2)
    assert params["settle"] == auditor.SETTLE_S > 0  # rows published in the last seconds are not sampled
    assert auditor.window_seconds(settings(OUTBOX_RETENTION_SECONDS=0)) == auditor.WINDOW_S


def test_no_shards_no_statement_and_no_reader():
    pool = FakePool([(row(1), 0, 1)])
    audit, made = make(600, pool, owned=())
    assert asyncio.run(audit.once()) == audit.interval
    assert pool.params == [] and made == []


def test_off_starts_nothing():
    class Tasks:
        started: list[str] = []

        def start(self, name, run):
            self.started.append(name)
    tasks = Tasks()
    assert auditor.start(tasks, settings(), FakePool(), lambda: (1,), lambda: True) is None
    assert tasks.started == []
    assert auditor.start(tasks, settings(OUTBOX_AUDIT_SAMPLE_PER_MINUTE=60), FakePool(), lambda: (1,),
                         lambda: True) is not None
    assert tasks.started == ["auditor"]


# ---- what each answer counts -----------------------------------------------------------------


def test_each_answer_is_counted_as_its_kind_and_a_finding_logs_one_line(caplog):
    same, lost, changed, moved, rekeyed = row(1), row(2), row(3), row(4), row(5)
    records = {(0, 10): record_of(same, 0, 10),
               # (0, 20) holds nothing: missing
               (1, 30): record_of(changed, 1, 30, value=b'{"n":2}'),
               (1, 40): record_of(row(99), 1, 40),
               (2, 50): record_of(rekeyed, 2, 50, key=b"other")}
    rows = [(same, 0, 10), (lost, 0, 20), (changed, 1, 30), (moved, 1, 40), (rekeyed, 2, 50)]
    audit, made = make(6000, FakePool(rows), FakeReader(records))
    audit.per_pass = 5  # this pass takes all five
    before = counts()
    with caplog.at_level(logging.INFO, logger="kaireon_pub.worker.auditor"):
        asyncio.run(audit.once())
    audit.close()
    assert delta(before) == {"checked": 5, "missing": 1, "altered": 2, "other_event": 1}
    found = [r for r in caplog.records if getattr(r, "event", None) == "audit finding"]
    assert [(r.eventId, r.topic, r.partition, r.offset, r.kind) for r in found] == [
        (2, "orders", 0, 20, "missing"), (3, "orders", 1, 30, "altered"),
        (4, "orders", 1, 40, "other_event"), (5, "orders", 2, 50, "altered")]
    assert all(r.levelno == logging.ERROR and len(r.errorId) > 0 for r in found)
    assert made[0].reads == [("orders", p, o) for _, p, o in rows]


def test_a_broker_that_cannot_be_read_is_an_error_not_a_finding_and_waits_a_minute(caplog):
    rows = [(row(1), 0, 10), (row(2), 0, 11)]
    audit, made = make(6000, FakePool(rows), FakeReader(error=TimeoutError("no record from offset 10 in 5 s")))
    audit.per_pass = 2
    before = counts()
    with caplog.at_level(logging.INFO, logger="kaireon_pub.worker.auditor"):
        assert asyncio.run(audit.once()) == auditor.ERROR_PAUSE_S
        assert asyncio.run(audit.once()) == auditor.ERROR_PAUSE_S  # again: counted, logged once a minute
    audit.close()
    assert delta(before) == {"errors": 2}
    assert made[0].reads == [("orders", 0, 10)] * 2  # the pass ends at the first error
    failed = [r for r in caplog.records if getattr(r, "event", None) == "audit failed"]
    assert len(failed) == 1 and failed[0].isTransient and "the broker could not be read" in failed[0].getMessage()


def test_a_deleted_topic_or_partition_is_missing_at_once_and_the_pass_goes_on(caplog):
    """Against real Kafka a read on a deleted topic times out (5 s) and would end the pass as an
    error: the topic's partitions are asked first, once a pass, and an unknown one is a finding."""
    rows = [(row(1), 0, 10), (row(2, topic="gone"), 0, 5), (row(3, topic="gone"), 1, 6), (row(4), 7, 1),
            (row(5), 0, 11)]
    reader = FakeReader({(0, 10): record_of(row(1), 0, 10), (0, 11): record_of(row(5), 0, 11)},
                        topics={"orders": [0, 1, 2]})
    audit, made = make(6000, FakePool(rows), reader)
    audit.per_pass = 5
    before = counts()
    with caplog.at_level(logging.INFO, logger="kaireon_pub.worker.auditor"):
        assert asyncio.run(audit.once()) < auditor.ERROR_PAUSE_S
    audit.close()
    assert delta(before) == {"checked": 5, "missing": 3}
    found = [(r.eventId, r.kind) for r in caplog.records if getattr(r, "event", None) == "audit finding"]
    assert found == [(2, "missing"), (3, "missing"), (4, "missing")]
    assert made[0].reads == [("orders", 0, 10), ("orders", 0, 11)]  # nothing read where nothing can be
    assert made[0].asked == [("partitions", "orders"), ("partitions", "gone")]  # once a topic a pass


def test_on_a_compacted_topic_a_gap_below_the_high_watermark_is_not_a_finding():
    """The broker removes a record superseded by a later one of its key: a compacted topic's normal
    state, not loss. Past the high watermark (compaction never lowers it), and on a topic that is not
    compacted, a position without a record stays missing. The policy is read once in POLICY_TTL_S."""
    rows = [(row(1), 0, 10), (row(2), 0, 20), (row(3, topic="plain"), 0, 30)]
    clock = Clock()
    reader = FakeReader({(0, 10): record_of(row(1), 0, 10)}, topics={"orders": [0], "plain": [0]},
                        compacted_topics=("orders",), high=15)
    audit, made = make(6000, FakePool(rows), reader, clock=clock)
    audit.per_pass = 3
    before = counts()
    asyncio.run(audit.once())
    assert delta(before) == {"checked": 3, "missing": 2}  # 20 >= the high watermark; "plain" is not compacted
    reader.high = 100  # now offset 20 lies below it: a gap the broker's compaction left
    reader.records.pop((0, 10))
    asyncio.run(audit.once())
    assert delta(before) == {"checked": 6, "missing": 2}  # (0, 10) and (0, 20): compacted, not findings
    assert made[0].asked.count(("policy", "orders")) == 1 and made[0].asked.count(("policy", "plain")) == 1
    clock.now += auditor.POLICY_TTL_S
    asyncio.run(audit.once())
    audit.close()
    assert made[0].asked.count(("policy", "orders")) == 2


def test_a_database_that_cannot_be_read_is_an_error_and_reads_nothing():
    audit, made = make(600, FakePool(error=OSError("connection refused")))
    before = counts()
    assert asyncio.run(audit.once()) == auditor.ERROR_PAUSE_S
    assert delta(before) == {"errors": 1} and made == []


def test_a_pass_that_finds_nothing_to_audit_lets_its_samples_lapse():
    """An idle window (no published row with a position) is no debt: the next pass asks for its
    own share only, not a burst of the missed ones."""
    pool = FakePool()
    audit, _ = make(60, pool)
    for _ in range(5):
        asyncio.run(audit.once())
    assert [p["n"] for p in pool.params] == [1] * 5


# ---- the reader ----------------------------------------------------------------------------------


def test_the_reader_is_made_on_first_use_in_its_thread_and_closed_there_when_the_task_stops(monkeypatch):
    r = row(1)
    reader = FakeReader({(0, 1): record_of(r, 0, 1)})
    audit, made = make(600, FakePool([(r, 0, 1)]), reader)
    assert made == []  # nothing made before the first read (the worker forks first)
    passes = []

    async def once():
        passes.append(await auditor.Auditor.once(audit))
        return 0.0
    monkeypatch.setattr(audit, "once", once)

    async def main():
        task = asyncio.create_task(audit.run(lambda: len(passes) >= 3))
        await task
    monkeypatch.setattr(audit, "first_pause", 0.0)
    asyncio.run(main())
    assert len(made) == 1 and made[0].made_in.startswith("kaireon-audit")
    for _ in range(100):
        if reader.closed_in is not None:
            break
        threading.Event().wait(0.01)
    assert reader.closed_in is not None and reader.closed_in.startswith("kaireon-audit")
    assert len(reader.reads) == 3


def test_a_finding_sampled_again_is_checked_but_counted_and_logged_once(caplog):
    lost = row(2)
    audit, _ = make(6000, FakePool([(lost, 0, 20)]), FakeReader({}))
    before = counts()
    with caplog.at_level(logging.INFO, logger="kaireon_pub.worker.auditor"):
        for _ in range(3):
            asyncio.run(audit.once())
    audit.close()
    assert delta(before) == {"checked": 3, "missing": 1}
    assert len([r for r in caplog.records if getattr(r, "event", None) == "audit finding"]) == 1


def test_the_reader_is_the_tiers_consumer_with_a_short_fetch_wait(monkeypatch):
    """read_at with librdkafka's 500 ms fetch.wait.max.ms took 0.5 s a record (measured): 10 ms."""
    made = {}

    class Reader:
        def __init__(self, config, client_id):
            made.update(config=config, client_id=client_id)
    monkeypatch.setattr("kaireon_pub.audit.broker.RecordReader", Reader)
    s = settings(OUTBOX_AUDIT_SAMPLE_PER_MINUTE=60, KAFKA_SASL_MECHANISM="PLAIN")
    auditor._record_reader(s)
    assert made["config"] == {**s.producer_config, "fetch.wait.max.ms": "10"}
    assert made["client_id"] == "kaireon-pub-audit"
