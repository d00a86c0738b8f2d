"""`kaireon-pub replay` under faults: acknowledgements without a position, a delivery report or a
producer that raises, and the run's hold through long waits (no services: fakes of the producer
and of the connections)."""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import Message

from kaireon_pub.errors import ExitCode
from kaireon_pub.ops import replay as ops_replay
from kaireon_pub.ops.replay import Plan, R, Selection, command, engine

from .test_replay_selection import FakeProducer, replay_on, row, settings


class DuplicateAcks(FakeProducer):
    """Acknowledges every record as librdkafka does a retry the broker recognised as a duplicate
    (or acks=0): offset -1, which confluent-kafka's Message.offset() gives as None."""

    def poll(self, _timeout: float = 0) -> int:
        served = 0
        while self.pending:
            topic, _v, _k, _h, report = self.produced[self.pending.pop(0)]
            report(None, Message(topic=topic, partition=0, offset=-1))
            served += 1
        return served


def test_an_acknowledgement_without_an_offset_leaves_the_position_unknown_and_the_run_goes_on():
    assert Message(topic="t", partition=0, offset=-1).offset() is None  # what the fault is
    run, conn = replay_on([row(1, 50, "a"), row(2, 51, "a")], DuplicateAcks())
    run.run()
    assert run.progress.failed is None and run.progress.published == 2
    saved = [(i, p, o) for params in conn.positions
             for i, p, o in zip(params["ids"], params["partitions"], params["offsets"], strict=True)]
    assert saved == [(1, 0, None), (2, 0, None)]  # NULL: unverifiable, no longer the lost offset
    assert conn.advances[-1]["cursor_id"] == 2


class BadReport(FakeProducer):
    """A delivery report whose message cannot be read (anything librdkafka might hand back)."""

    def poll(self, _timeout: float = 0) -> int:
        served = 0
        while self.pending:
            _t, _v, _k, _h, report = self.produced[self.pending.pop(0)]
            report(None, object())  # no partition(), no offset()
            served += 1
        return served


def test_a_delivery_report_that_cannot_be_read_fails_the_run_without_raising_and_saves_the_cursor():
    run, conn = replay_on([row(1, 50, "a"), row(2, 51, "a")], BadReport())
    run.run()  # raises nothing
    assert run.progress.failed is not None and run.progress.failed.startswith("event 1: delivery report")
    assert conn.advances[-1]["cursor_id"] == 1  # acknowledged, so passed; event 2 was not sent


class Timed:
    """Records when the replay wrote its run's row (each write renews the hold)."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.at: list[float] = []
        execute = conn.execute

        def timed(text: str, params: dict[str, Any]) -> Any:
            if text == R.replay_advance:
                self.at.append(time.monotonic())
            return execute(text, params)
        conn.execute = timed


def test_the_hold_is_renewed_while_the_rate_cap_waits(monkeypatch):
    monkeypatch.setattr(engine, "SAVE_EVERY_S", 0.02)
    producer = FakeProducer()
    sent: list[float] = []
    produce = producer.produce

    def timed_produce(*args: Any, **kwargs: Any) -> None:
        sent.append(time.monotonic())
        produce(*args, **kwargs)
    producer.produce = timed_produce
    run, conn = replay_on([row(1, 50, "a"), row(2, 51, "a")], producer)
    run.bucket = ops_replay.TokenBucket(4, wait=run._serve)  # 0.25 s between the two records
    timed = Timed(conn)
    run.run()
    assert len(sent) == 2
    assert sum(sent[0] < t < sent[1] for t in timed.at) >= 2  # saved while it waited, not only after


class SlowAcks(FakeProducer):
    """Acknowledges nothing for `delay` seconds after the first poll, then everything."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.first: float | None = None

    def poll(self, timeout: float = 0) -> int:
        self.first = self.first or time.monotonic()
        if time.monotonic() - self.first < self.delay:
            time.sleep(min(timeout, 0.01))
            return 0
        return super().poll(timeout)


def test_the_hold_is_renewed_while_the_last_records_are_drained(monkeypatch):
    monkeypatch.setattr(engine, "SAVE_EVERY_S", 0.02)
    run, conn = replay_on([row(1, 50, "a")], SlowAcks(0.3))
    timed = Timed(conn)
    run.run()
    assert run.progress.published == 1
    assert len(timed.at) >= 5  # renewed through the 0.3 s drain, not only once at its end


class CommandConn:
    """The command's connection: answers replay.sql's statements, records them."""

    def __init__(self) -> None:
        self.broken = False
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def __enter__(self) -> CommandConn:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def execute(self, text: str, params: dict[str, Any] | None = None) -> Any:
        self.sent.append((text, params or {}))
        answers = {R.replay_now: (datetime(2026, 12, 6, 12, tzinfo=UTC),), R.replay_count: (2, [1, 2]),
                   R.replay_start: (41, "kaireon"), R.replay_advance: (41,)}

        class Result:
            def fetchone(self) -> Any:
                return answers.get(text)
        return Result()

    def transaction(self) -> Any:
        return contextlib.nullcontext()

    def named(self, name: Any) -> list[dict[str, Any]]:
        return [params for text, params in self.sent if text == name]


class Crashing(FakeProducer):
    def produce(self, topic, value, key, headers, on_delivery):
        if len(self.produced) == 1:
            raise RuntimeError("something nobody planned for")
        super().produce(topic, value, key, headers, on_delivery)


def test_an_unexpected_error_still_ends_the_run_with_its_cursor_and_an_error_line(monkeypatch, caplog):
    conn = CommandConn()
    monkeypatch.setattr(command, "connect", lambda _settings, _role: conn)
    monkeypatch.setattr(command.migrate, "require_current", lambda _conn: None)
    monkeypatch.setattr(command, "stream", lambda _conn, _sel, _cursor: iter([row(1, 50, "a"), row(2, 51, "a")]))
    monkeypatch.setattr("kaireon_pub.worker.kafka.producer.make_producer", lambda _s, _n: Crashing())
    said: list[str] = []
    code = ops_replay.run(settings(), Plan(Selection(), rate=0), dry_run=False, yes=True,
                          confirm=lambda _q: True, echo=said.append)
    assert code == ExitCode.CRASH
    [end] = conn.named(R.replay_end)
    assert end["state"] == "failed" and "RuntimeError: something nobody planned for" in end["error"]
    assert conn.named(R.replay_advance)[-1]["cursor_id"] == 1  # the first event, acknowledged, is passed
    assert said[-1].startswith("replay run 41 failed: 1 of 2 events published")
    assert "resume with `kaireon-pub replay --resume 41`" in said[-1]
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "replay"]
    assert line.errorType == "RuntimeError" and line.outcome == "failed" and line.exc_info is None


@pytest.mark.parametrize("value", [None, -1, -1001])
def test_a_position_without_a_value_is_unknown(value):
    assert engine._known(value) is None and engine._known(0) == 0 and engine._known(7) == 7
