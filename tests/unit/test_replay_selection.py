"""`replay`'s selection (kaireon_pub/ops/replay/, db/replay.sql) and command line, and one run's
publish loop on a fake producer and a fake connection (no services)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from click.testing import CliRunner

from kaireon_pub.cli import cli
from kaireon_pub.ops import replay as ops_replay
from kaireon_pub.ops.replay import REPLAY_HEADER, START, Plan, Progress, R, Replay, Selection, Stop, parse_time
from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka.records import record_headers, record_key
from kaireon_pub.worker.rows import Row

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def test_times_are_iso_8601_and_utc_unless_they_say_otherwise():
    assert parse_time("2026-12-06T12:00:00Z") == T0
    assert parse_time("2026-12-06 12:00") == T0
    assert parse_time("2026-12-06T13:00:00+01:00") == T0
    assert parse_time("2026-12-06").tzinfo is UTC
    before = datetime.now(UTC)
    assert before - timedelta(hours=6, seconds=5) < parse_time("6h") <= datetime.now(UTC) - timedelta(hours=6)
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_validation_names_what_is_wrong():
    assert Selection().validate() is None  # every retained event (the confirmation guards a large one)
    assert "--id-from 9 is after --id-to 3" in Selection(id_from=9, id_to=3).validate()
    assert "--since must be before --until" in Selection(since=T0, until=T0).validate()
    assert "--key" in Selection(keys=("",)).validate()
    assert "--topic" in Selection(topics=("",)).validate()


def test_the_window_end_is_fixed_at_the_start_unless_given_and_a_resume_reads_back_the_same():
    open_ended = Selection(keys=("a", "b"), id_from=5, since=T0, topics=("orders",))
    with pytest.raises(ValueError):
        open_ended.params()
    fixed = open_ended.fixed(T0 + timedelta(hours=1))
    assert fixed.until == T0 + timedelta(hours=1)
    given = Selection(until=T0).fixed(T0 + timedelta(days=1))
    assert given.until == T0
    doc = fixed.describe()
    assert doc == {"window": "published_at", "keys": ["a", "b"], "idFrom": 5, "since": "2026-12-06T12:00:00+00:00",
                   "until": "2026-12-06T13:00:00+00:00", "topics": ["orders"]}
    assert Selection.from_json(doc) == fixed
    other_zone = Selection(since=datetime(2026, 12, 6, 14, 0, tzinfo=timezone(timedelta(hours=2)))).fixed(T0)
    assert Selection.from_json(other_zone.describe()).since == T0


def test_params_leave_an_unused_filter_null_and_carry_the_cursor():
    params = Selection(id_to=40).fixed(T0).params(("812", 33))
    assert params == {"keys": None, "id_from": None, "id_to": 40, "since": None, "until": T0, "topics": None,
                      "cursor_xid": "812", "cursor_id": 33}
    assert Selection(keys=("k",), topics=("t",)).fixed(T0).params()["keys"] == ["k"]
    assert Selection().fixed(T0).params()["cursor_xid"] == START[0]


def test_the_rows_are_the_selection_after_the_cursor_in_xid_id_order_of_published_rows_read_once():
    rows = " ".join(R.replay_rows.split())
    assert "e.status = 'published'" in rows and "e.published_at < %(until)s" in rows
    assert "(e.xid, e.id) > (%(cursor_xid)s::text::xid8, %(cursor_id)s::bigint)" in rows
    # One statement for the whole selection (a server-side cursor), not one sorted page per query.
    assert rows.rstrip(";").endswith("ORDER BY e.xid, e.id") and "LIMIT" not in rows
    assert "{{" not in R.replay_count and "(e.xid, e.id) >" in R.replay_count  # a resume counts what is left


# ---- the command line ------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_run(settings, plan, **kwargs):
        calls.append({"plan": plan, **kwargs})
        return 0
    monkeypatch.setattr(ops_replay, "run", fake_run)
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@127.0.0.1:1/x")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    return calls


def test_the_options_become_the_selection(captured):
    result = CliRunner().invoke(cli, ["replay", "--key", "a", "--key", "b", "--id-from", "3", "--id-to", "9",
                                      "--since", "2026-12-06T12:00:00Z", "--topic", "orders", "--to-topic", "fixed",
                                      "--rate", "250", "--by", "alice", "--dry-run"])
    assert result.exit_code == 0, result.output
    [call] = captured
    plan = call["plan"]
    assert plan.selection == Selection(keys=("a", "b"), id_from=3, id_to=9, since=T0, topics=("orders",))
    assert (plan.to_topic, plan.rate, plan.operator, plan.run_id) == ("fixed", 250, "alice", None)
    assert call["dry_run"] is True and call["yes"] is False


@pytest.mark.parametrize(("args", "says"), [
    (["--resume", "4", "--key", "a"], "--resume continues a run with its own selection"),
    (["--resume", "4", "--to-topic", "x"], "--resume continues a run with its own selection"),
    (["--id-from", "9", "--id-to", "2"], "--id-from 9 is after --id-to 2"),
    (["--since", "last tuesday"], "is neither an ISO 8601 time"),
    (["--to-topic", "no spaces"], "is not a valid Kafka topic name"),
    (["--rate", "-1"], "-1"),
])
def test_usage_errors_change_nothing(captured, args, says):
    result = CliRunner().invoke(cli, ["replay", *args])
    assert result.exit_code == 2 and says in result.output
    assert captured == []


def test_a_resume_takes_only_a_rate(captured):
    result = CliRunner().invoke(cli, ["replay", "--resume", "12", "--rate", "0"])
    assert result.exit_code == 0, result.output
    assert captured[0]["plan"].run_id == 12 and captured[0]["plan"].rate == 0


def test_the_rate_of_a_plan():
    assert Plan(Selection()).cap() == ops_replay.DEFAULT_RATE
    assert Plan(Selection(), rate=0).cap() is None
    assert Plan(Selection(), rate=40).cap() == 40


# ---- one run's loop on fakes -----------------------------------------------------------------


class FakeMessage:
    def __init__(self, partition: int, offset: int):
        self._partition, self._offset = partition, offset

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


class FakeProducer:
    """Keeps what was produced; the test delivers (or fails) them, in any order."""

    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes | None, bytes | None, list, Any]] = []
        self.pending: list[int] = []
        self.fail_ids: set[int] = set()

    def produce(self, topic, value, key, headers, on_delivery):
        self.produced.append((topic, value, key, headers, on_delivery))
        self.pending.append(len(self.produced) - 1)

    def poll(self, _timeout: float = 0) -> int:
        # Deliveries come back last first: the cursor must wait for the earlier ones.
        served = 0
        while self.pending:
            index = self.pending.pop()
            topic, _v, _k, headers, report = self.produced[index]
            event_id = int(dict(headers)["event-id"])
            report("boom" if event_id in self.fail_ids else None, FakeMessage(event_id % 3, 100 + index))
            served += 1
        return served

    def __len__(self) -> int:
        return len(self.pending)


class FakeConn:
    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.advances: list[dict[str, Any]] = []
        self.positions: list[dict[str, Any]] = []
        self.reads: list[tuple[str, int]] = []

    def execute(self, text: str, params: dict[str, Any]) -> Any:

        class Result:
            def fetchone(self) -> tuple:
                return (1,)
        if text == R.replay_advance:
            self.advances.append(params)
        elif text == R.replay_positions:
            self.positions.append(params)
        return Result()

    def transaction(self) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def read(self, cursor: tuple[str, int]) -> Iterator[tuple]:
        """Replay's `read`: the rows after `cursor`, as `stream` gives them."""
        self.reads.append(cursor)
        after = (int(cursor[0]), cursor[1])
        yield from (tuple(r) for r in self.rows if (r.xid, r.id) > after)


def row(event_id: int, xid: int, key: str, topic: str = "orders") -> Row:
    return Row(event_id, topic, key, b'{"n":%d}' % event_id, "{}", "created", 1, 0, xid, 0.0,
               "2026-12-06T12:00:00.000000Z")


def settings() -> Settings:
    return Settings.from_env({"DATABASE_URL": "postgresql://u@127.0.0.1:1/x", "KAFKA_BOOTSTRAP_SERVERS": "k:1"})


def replay_on(rows: list[Row], producer: FakeProducer, *, to_topic: str | None = None,
              cursor: tuple[str, int] = START) -> tuple[Replay, FakeConn]:
    conn = FakeConn(rows)
    plan = Plan(Selection().fixed(T0), to_topic=to_topic, rate=None)
    run = Replay(settings(), conn, plan, 7, cursor, "h:1", Progress(), Stop(), lambda _p: None, conn.read,
                 producer=producer)
    return run, conn


def test_records_are_the_workers_records_plus_the_replay_header_in_xid_id_order():
    rows = [row(3, 50, "a"), row(1, 51, "b"), row(2, 51, "a"), row(9, 52, "a")]  # (xid, id) order as given
    producer = FakeProducer()
    run, conn = replay_on(rows, producer)
    run.run()
    assert [p[0] for p in producer.produced] == ["orders"] * 4
    for (_topic, value, key, headers, _), r in zip(producer.produced, rows, strict=True):
        assert (value, key) == (r.payload, record_key(r))
        assert headers == [*record_headers(r), (REPLAY_HEADER, b"7")]
    assert conn.advances[-1]["cursor_id"] == 9 and conn.advances[-1]["cursor_xid"] == "52"
    assert sum(a["published"] for a in conn.advances) == 4
    assert sorted(conn.positions[-1]["ids"]) == [1, 2, 3, 9]  # their own topic: the rows' new positions
    assert conn.reads == [START]  # the selection is read once, from the run's cursor, not page by page


def test_to_another_topic_the_positions_stay_and_a_failure_holds_the_cursor_before_it():
    rows = [row(1, 50, "a"), row(2, 50, "b"), row(3, 51, "a")]
    producer = FakeProducer()
    producer.fail_ids = {2}
    run, conn = replay_on(rows, producer, to_topic="elsewhere")
    run.run()
    assert {p[0] for p in producer.produced} == {"elsewhere"}
    assert conn.positions == []
    assert run.progress.failed == "event 2: boom"
    assert (conn.advances[-1]["cursor_xid"], conn.advances[-1]["cursor_id"]) == ("50", 1)  # 3 goes again


def test_a_row_that_cannot_become_a_record_is_counted_and_passed_over():
    bad = row(2, 50, "a")._replace(headers='["not an object"]')
    producer = FakeProducer()
    run, conn = replay_on([row(1, 50, "a"), bad, row(3, 50, "a")], producer)
    run.run()
    assert [int(dict(p[3])["event-id"]) for p in producer.produced] == [1, 3]
    assert run.progress.skipped == 1 and run.progress.skipped_ids == [2]
    assert conn.advances[-1]["cursor_id"] == 3 and sum(a["skipped"] for a in conn.advances) == 1


def test_a_resume_starts_after_its_cursor_and_a_signal_stops_it():
    rows = [row(i, 60, "k") for i in range(1, 7)]
    producer = FakeProducer()
    run, conn = replay_on(rows, producer, cursor=("60", 4))
    run.run()
    assert [int(dict(p[3])["event-id"]) for p in producer.produced] == [5, 6]
    producer = FakeProducer()
    run, conn = replay_on(rows, producer)
    run.stop.signal = 15
    run.run()
    assert producer.produced == [] and conn.advances[-1]["cursor_id"] is None


def test_the_progress_bar_is_one_line_on_a_terminal_and_nothing_otherwise(capsys):
    ops_replay.progress_printer(False, 3, 10)(Progress(published=5))
    assert capsys.readouterr().err == ""
    ops_replay.progress_printer(True, 3, 10)(Progress(published=4, skipped=1))
    err = capsys.readouterr().err
    assert err.startswith("\rreplay run 3 [###############") and " 5/10 " in err and "\n" not in err
