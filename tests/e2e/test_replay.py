"""`kaireon-pub replay` (kaireon_pub/ops/replay.py) against a real Apache Kafka (`kafka_broker`).

The rows are made published by SQL (the original records never reached the topic, as after a
broker lost them); the command runs as a subprocess, as an operator runs it, and the records are
read back by a consumer:
- `--rate 500` over 2,500 events on 50 keys and 4 partitions: the records' own timestamps (set at
  produce) span 2,499 / 500 s within 10 %, the command's summary says the same; per-key order;
  each record is the row's key and value with its event-id and a `kaireon-replay: RUN_ID` header;
  the rows then point at the new records (published_partition/offset); one log line names who,
  what and how many;
- `--to-topic` with a key and id selection: exactly those events, on the other topic, in order;
  the rows' positions untouched; `--dry-run` publishes nothing (the target topic is never created);
- a run SIGKILLed mid-way and resumed with `--resume`: every event at least once, and the only
  duplicates are the records the killed process had delivered past its saved cursor (in flight).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from kaireon_pub import Event, enqueue_many
from tests.helpers import TopicReader, assert_per_key_order, create_led_topic, event_ids, run_cli, tier_env, wait_for

pytestmark = pytest.mark.not_via_pgbouncer("the broker's records are the subject; these tests run once, directly")

PARTITIONS = 4


@pytest.fixture(scope="module")
def admin(kafka_broker) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_broker.bootstrap, "log_level": 0})


def create_topic(admin: AdminClient, name: str) -> str:
    return create_led_topic(admin, name, PARTITIONS)


def published_events(db_url: str, topic: str, n: int, keys: int) -> list[int]:
    """`n` events on `keys` keys, committed and then marked published by SQL (no record made)."""
    with psycopg.connect(db_url) as conn:
        ids = enqueue_many(conn, [Event(topic, f"key-{i % keys}", {"i": i, "pad": "x" * 50}) for i in range(n)])
        conn.commit()
        conn.execute("UPDATE outbox_events SET status = 'published', published_at = clock_timestamp() "
                     "WHERE id = ANY(%s)", (ids,))
        conn.commit()
    return ids


def replay_env(db_url: str, kafka_broker: Any, tmp_path: Path) -> dict[str, str]:
    return tier_env(db_url, kafka_broker.bootstrap, tmp_path, USER="ops-tester")


def replay_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "replay"]


def run_row(db_url: str, run_id: int) -> dict[str, Any]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        cur = conn.execute("SELECT *, cursor_xid::text AS cursor_xid_text FROM outbox_replay_runs WHERE id = %s",
                           (run_id,))
        return dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))


def header(msg: Any, name: str) -> bytes | None:
    return dict(msg.headers() or []).get(name)


def high_watermarks(bootstrap: str, topic: str) -> int:
    """Records on `topic` now: the sum of its partitions' high watermarks (nothing deleted)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"hw-{uuid.uuid4().hex[:6]}", "log_level": 0})
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS))
    finally:
        consumer.close()


def test_replay_at_its_rate_in_per_key_order_with_its_header(db_url, kafka_broker, admin, tmp_path):
    topic = create_topic(admin, f"replay-{uuid.uuid4().hex[:8]}")
    ids = published_events(db_url, topic, 2500, keys=50)
    result = run_cli("replay", "--topic", topic, "--rate", "500", "--by", "alice",
                     env=replay_env(db_url, kafka_broker, tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = int(result.stdout.split()[2])
    assert f"replay run {run_id} finished: 2,500 of 2,500 events published to their own topics" in result.stdout

    with TopicReader(kafka_broker.bootstrap, topic) as reader:
        messages = reader.read_ids(ids, timeout=60)
    assert len(messages) == 2500 and sorted(event_ids(messages)) == ids  # each once
    assert_per_key_order(messages)
    assert {header(m, "kaireon-replay") for m in messages} == {str(run_id).encode()}

    # The rate, from the records' own timestamps (set when each was produced) and from the summary.
    stamps = sorted(m.timestamp()[1] for m in messages)
    measured = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000)
    assert 0.9 <= measured / 500 <= 1.1, f"{measured:.1f} events/s from the records' timestamps"
    said = float(result.stdout.split("(")[1].split()[0].replace(",", ""))
    assert 0.9 <= said / 500 <= 1.1, result.stdout

    # Each record: the row's key and value; the rows now point at the new records.
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, partition_key, coalesce(payload_bytes, convert_to(payload::text, 'UTF8')), "
            "published_partition, published_offset "
            "FROM outbox_events")}
    for msg in messages:
        key, value, partition, offset = rows[int(header(msg, "event-id"))]
        assert (msg.key(), msg.value()) == (key.encode(), value)
        assert (partition, offset) == (msg.partition(), msg.offset())

    # One log line for the run: who, what, how many.
    [line] = replay_lines(result.stderr)
    assert line["operator"] == "alice" and line["dbUser"] and line["runId"] == run_id
    assert (line["selected"], line["published"], line["outcome"]) == (2500, 2500, "finished")
    assert line["selection"]["topics"] == [topic] and line["rate"] == 500
    row = run_row(db_url, run_id)
    assert (row["state"], row["published"], row["selected"], row["operator"]) == ("finished", 2500, 2500, "alice")
    assert row["cursor_id"] == ids[-1] and row["finished_at"] is not None


def test_to_another_topic_exactly_the_selection_and_a_dry_run_publishes_nothing(db_url, kafka_broker, admin,
                                                                              tmp_path):
    topic = create_topic(admin, f"replay-{uuid.uuid4().hex[:8]}")
    target = create_topic(admin, f"replay-to-{uuid.uuid4().hex[:8]}")
    never = f"replay-never-{uuid.uuid4().hex[:8]}"
    ids = published_events(db_url, topic, 300, keys=6)
    env = replay_env(db_url, kafka_broker, tmp_path)
    chosen = [i for n, i in enumerate(ids) if n % 6 in (1, 4) and i >= ids[50]]  # key-1 and key-4 from the 51st

    dry = run_cli("replay", "--key", "key-1", "--key", "key-4", "--id-from", str(ids[50]), "--to-topic", never,
                  "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.startswith(f"would replay {len(chosen)} events to topic {never} (ids {chosen[0]}, ")
    assert never not in admin.list_topics(timeout=10).topics  # nothing was produced: auto-create never ran
    assert [line["outcome"] for line in replay_lines(dry.stderr)] == ["dry run"]

    result = run_cli("replay", "--key", "key-1", "--key", "key-4", "--id-from", str(ids[50]), "--to-topic", target,
                     "--rate", "0", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    with TopicReader(kafka_broker.bootstrap, target) as reader:
        messages = reader.read_ids(chosen, timeout=60, extra=1.0)
    assert sorted(event_ids(messages)) == chosen  # those, each once, nothing else
    assert_per_key_order(messages)
    assert {m.key() for m in messages} == {b"key-1", b"key-4"}
    with psycopg.connect(db_url, autocommit=True) as conn:  # another topic: the rows' positions are left
        assert conn.execute("SELECT count(*) FROM outbox_events WHERE published_offset IS NOT NULL").fetchone() == (0,)
    with TopicReader(kafka_broker.bootstrap, topic) as reader:  # and their own topic got nothing
        assert reader.read_until(lambda _m: True, 5) == []


def test_a_killed_run_resumed_publishes_every_event_duplicating_only_those_in_flight(db_url, kafka_broker, admin,
                                                                                     tmp_path):
    topic = create_topic(admin, f"replay-{uuid.uuid4().hex[:8]}")
    ids = published_events(db_url, topic, 2500, keys=40)
    env = replay_env(db_url, kafka_broker, tmp_path)
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-m", "kaireon_pub", "replay", "--topic", topic, "--rate", "800"],
                                 env=env, stdout=out, stderr=err)
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            run_id = wait_for(lambda: (conn.execute("SELECT id FROM outbox_replay_runs WHERE published >= 600")
                                       .fetchone() or [None])[0], 30, "the run past 600 acknowledged events")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    saved = run_row(db_url, run_id)
    assert saved["state"] == "running" and saved["finished_at"] is None  # killed: it could say nothing
    cursor = saved["cursor_id"]
    assert cursor is not None and saved["published"] < 2500

    on_topic = high_watermarks(kafka_broker.bootstrap, topic)
    with TopicReader(kafka_broker.bootstrap, topic) as reader:
        before = event_ids(reader.read_count(on_topic, timeout=60))
    # In (xid, id) order, which is id order here (one transaction): the cursor's prefix all landed.
    assert set(ids[:ids.index(cursor) + 1]) <= set(before)

    resumed = run_cli("replay", "--resume", str(run_id), "--rate", "0", env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"replay run {run_id} finished" in resumed.stdout
    with TopicReader(kafka_broker.bootstrap, topic) as reader:
        messages = reader.read_ids(ids, timeout=60)
        messages = reader.read_count(on_topic + len(ids) - ids.index(cursor) - 1, timeout=30)
    counts = collections.Counter(event_ids(messages))
    assert set(counts) == set(ids)  # every event at least once
    duplicates = {i for i, n in counts.items() if n > 1}
    in_flight = {i for i in before if i > cursor}  # delivered by the killed run past its saved cursor
    assert duplicates == in_flight and max(counts.values()) <= 2
    assert len(in_flight) < 1600, "duplicates: what was delivered since the last save (every 0.5 s), not more"
    assert_per_key_order(messages)
    assert {header(m, "kaireon-replay") for m in messages} == {str(run_id).encode()}
    row = run_row(db_url, run_id)
    assert (row["state"], row["cursor_id"]) == ("finished", ids[-1])
    left = len(ids) - ids.index(cursor) - 1
    assert f"{left:,} of {left:,} events published" in resumed.stdout
    [line] = replay_lines(resumed.stderr)
    assert line["resumed"] is True and line["outcome"] == "finished" and line["published"] == left
    again = run_cli("replay", "--resume", str(run_id), env=env)
    assert again.returncode == 0 and "nothing to resume" in again.stdout


def test_sigterm_stops_after_the_records_in_flight_and_the_resume_sends_no_duplicate(db_url, kafka_broker, admin,
                                                                                     tmp_path):
    topic = create_topic(admin, f"replay-{uuid.uuid4().hex[:8]}")
    ids = published_events(db_url, topic, 1000, keys=20)
    env = replay_env(db_url, kafka_broker, tmp_path)
    with open(tmp_path / "first.out", "w+") as out, open(tmp_path / "first.err", "w+") as err:
        first = subprocess.Popen([sys.executable, "-m", "kaireon_pub", "replay", "--topic", topic, "--rate", "400"],
                                 env=env, stdout=out, stderr=err, text=True)
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                run_id = wait_for(lambda: (conn.execute("SELECT id FROM outbox_replay_runs WHERE published >= 200")
                                           .fetchone() or [None])[0], 30, "the run past 200 acknowledged events")
            first.send_signal(signal.SIGTERM)
            assert first.wait(20) == 143
        finally:
            if first.poll() is None:
                first.kill()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert f"replay run {run_id} interrupted" in stdout and f"--resume {run_id}" in stdout
    [line] = replay_lines(stderr)
    assert line["outcome"] == "interrupted" and 200 <= line["published"] < 1000
    row = run_row(db_url, run_id)
    assert row["state"] == "interrupted" and row["holder"] is None and row["published"] == line["published"]
    assert row["cursor_id"] == ids[row["published"] - 1]  # everything in flight was waited for: no gap

    resumed = run_cli("replay", "--resume", str(run_id), "--rate", "0", env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with TopicReader(kafka_broker.bootstrap, topic) as reader:
        messages = reader.read_ids(ids, timeout=60, extra=1.0)
    assert sorted(event_ids(messages)) == ids  # each exactly once
    assert_per_key_order(messages)


def test_a_large_selection_asks_first_and_a_no_replays_nothing(db_url, kafka_broker, tmp_path):
    topic = f"replay-large-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO outbox_events (topic, partition_key, payload, status, published_at) "
                     "SELECT %s, 'k' || (g %% 7), '{}', 'published', clock_timestamp() "
                     "FROM generate_series(1, 10001) g", (topic,))
    result = run_cli("replay", "--topic", topic, env=replay_env(db_url, kafka_broker, tmp_path), input="n\n")
    assert result.returncode == 1 and "Replay 10,001 events to their own topics?" in result.stderr
    assert "nothing replayed" in result.stdout
    assert [line["outcome"] for line in replay_lines(result.stderr)] == ["declined"]
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_replay_runs").fetchone() == (0,)
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap, "log_level": 0})
    assert topic not in admin.list_topics(timeout=10).topics


def test_the_selection_is_read_once_in_order_by_a_transaction_that_never_holds_the_claim_horizon(db_url):
    """The rows come from one server-side cursor (sorted once, FETCH_ROWS a fetch), in (xid, id)
    order after the resume cursor; its transaction is read-only and takes no transaction id, so the
    claim horizon (running xids of pg_current_snapshot()) never waits for it while a run lasts."""
    from datetime import UTC, datetime

    from kaireon_pub.ops.replay import FETCH_ROWS, START, Selection, stream

    topic = f"stream-{uuid.uuid4().hex[:8]}"
    n = FETCH_ROWS * 2 + 100
    with psycopg.connect(db_url) as conn:  # three transactions: the xids interleave the ids
        ids = [i for part in (n // 2, n - n // 2) for i in published_events(db_url, topic, part, 7)]
        expected = [(int(x), i) for x, i in conn.execute(
            "SELECT xid::text, id FROM outbox_events WHERE id = ANY(%s) ORDER BY xid, id", (ids,))]
    selection = Selection(topics=(topic,)).fixed(datetime.now(UTC))
    with psycopg.connect(db_url, autocommit=True) as reading, psycopg.connect(db_url, autocommit=True) as probe:
        rows = stream(reading, selection, START)
        got = [next(rows)]
        xid, running, state = probe.execute(
            "SELECT a.backend_xid, a.backend_xid::text::xid8 = ANY(SELECT pg_snapshot_xip(pg_current_snapshot())), "
            "a.state FROM pg_stat_activity a WHERE a.pid = %s", (reading.info.backend_pid,)).fetchone()
        assert xid is None and not running and state == "idle in transaction"
        assert reading.execute("SHOW transaction_read_only").fetchone() == ("on",)
        got += list(rows)
        assert [(r[8], r[0]) for r in got] == expected
        assert reading.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # ended with the rows
        resumed = [(r[8], r[0]) for r in stream(reading, selection, (str(expected[99][0]), expected[99][1]))]
        assert resumed == expected[100:]
