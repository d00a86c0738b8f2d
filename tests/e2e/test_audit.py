"""`kaireon-pub audit` and `kaireon-pub locate` against a real Apache Kafka (`kafka_broker`).

The tier publishes through Kafka and its marks record where each event landed; the faults are
then made outside-in, as a broker or an operator would make them, and the commands run as
subprocesses, as an operator runs them (exit code, --json document):
- 100,000 events published by the tier: the audit finds nothing;
- rows marked published by plain SQL without a record (made-up positions: one holding another
  event, one past the partition's end): reported missing, exactly those;
- records produced again with their event-ids (a Producer of the test): duplicates, exactly those,
  with their extra copies; a key's two records produced in the wrong order (positions recorded by
  SQL): out of order;
- `locate`: the record at the recorded position is byte-equal to the row's value and key (read
  back by a consumer too), and `differs` when the record there is the event with another value;
  its exit codes for no row, not published, no position, missing;
- the topic deleted and recreated after 10,000 acknowledged events: the audit flags every one of
  them missing, `kaireon-pub replay` repairs the topic, and the audit is then clean.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kaireon_pub import Event, enqueue_many
from kaireon_pub.audit.broker import RecordReader
from tests import helpers
from tests.helpers import create_led_topic, run_cli, tier_env, wait_all_published, wait_for

# The big ones once, directly; the small ones (locate, the out-of-order audit) run through PgBouncer too:
# the audit's transaction and server-side cursor through a transaction pooler.
LARGE = pytest.mark.not_via_pgbouncer("the broker's records are the subject; the commands' way through "
                                      "PgBouncer is the smaller tests' of this file")

PARTITIONS = 3


@pytest.fixture(scope="module")
def admin(kafka_broker) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_broker.bootstrap, "log_level": 0})


def create_topic(admin: AdminClient, name: str) -> str:
    return create_led_topic(admin, name, PARTITIONS)


def commit(db_url: str, topic: str, n: int, *, keys: int, per_tx: int = 5000, tag: str = "e") -> list[int]:
    """`n` events on `keys` keys, `per_tx` per transaction; their ids."""
    ids: list[int] = []
    for start in range(0, n, per_tx):
        ids += helpers.commit(db_url, [Event(topic, f"key-{i % keys}", {"tag": tag, "i": i})
                                       for i in range(start, min(n, start + per_tx))])
    return ids


def publish(start_tier: Any, kafka_broker: Any, db_url: str, topic: str, n: int, *, keys: int,
            timeout: float = 60) -> tuple[Any, list[int]]:
    tier = start_tier(bootstrap=kafka_broker.bootstrap)
    ids = commit(db_url, topic, n, keys=keys)
    wait_all_published(db_url, n, timeout, f"{n} events published")
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_events WHERE published_offset IS NULL").fetchone() == (0,)
    return tier, ids


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    result = run_cli(*args, "--json", env=env, timeout=timeout)
    assert result.stdout.strip(), f"{args}: exit {result.returncode}, no output; stderr: {result.stderr[-3000:]}"
    return result.returncode, orjson.loads(result.stdout)


def finding_ids(doc: dict[str, Any], kind: str) -> set[int]:
    found = doc["findings"][kind]
    assert not found["truncated"]
    return {event["id"] for event in found["events"]}


def mark_by_hand(db_url: str, topic: str, positions: list[tuple[int, int]], *, tag: str) -> list[int]:
    """Events committed already published (one transaction, so no worker ever sees them pending),
    at made-up positions, and never produced; their ids."""
    with psycopg.connect(db_url) as conn:
        ids = enqueue_many(conn, [Event(topic, f"hand-{i}", {"tag": tag, "i": i}) for i in range(len(positions))])
        for event_id, (partition, offset) in zip(ids, positions, strict=True):
            conn.execute("UPDATE outbox_events SET status = 'published', published_at = clock_timestamp(), "
                         "published_partition = %s, published_offset = %s WHERE id = %s",
                         (partition, offset, event_id))
        conn.commit()
    return ids


def read_back(bootstrap: str, topic: str, partition: int, offset: int) -> Any:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex[:6]}", "log_level": 0,
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        # a list: a Message is falsy when its value is empty or a tombstone (len() is the value's)
        [msg] = wait_for(lambda: [m for m in [consumer.poll(0.5)] if m is not None], 30,
                         f"{topic}[{partition}]@{offset}")
        assert msg.error() is None and msg.offset() == offset
        return msg
    finally:
        consumer.close()


def on_terminal(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The command run with its stderr on a pseudo-terminal (stdout piped): .stderr is what the terminal got."""
    main, terminal = pty.openpty()
    chunks = []
    try:
        with open(os.devnull) as stdin, subprocess.Popen([sys.executable, "-m", "kaireon_pub", *args], env=env,
                                                         stdin=stdin, stdout=subprocess.PIPE, stderr=terminal,
                                                         text=True) as process:
            os.close(terminal)
            terminal = -1
            while True:  # read while it writes: a full terminal buffer would block it
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: the command's end of the terminal is closed, all read
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            stdout, _ = process.communicate(timeout=120)
    finally:
        os.close(main)
        if terminal != -1:
            os.close(terminal)
    return subprocess.CompletedProcess(args, process.returncode, stdout, b"".join(chunks).decode(errors="replace"))


def produce(bootstrap: str, records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Produce `records` (topic, partition, key, value, headers) in order, one at a time; their positions."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "log_level": 0})
    landed: list[Any] = []
    for record in records:
        producer.produce(record["topic"], record["value"], record["key"], partition=record["partition"],
                         headers=record["headers"], on_delivery=lambda err, msg: landed.append((err, msg)))
        assert producer.flush(30) == 0
    assert len(landed) == len(records) and all(err is None for err, _ in landed), landed
    return [(msg.partition(), msg.offset()) for _, msg in landed]


@LARGE
def test_after_100k_events_published_through_kafka_the_audit_finds_nothing(db_url, kafka_broker, admin,
                                                                             start_tier, tmp_path):
    topic = create_topic(admin, f"audit-{uuid.uuid4().hex[:8]}")
    started = time.monotonic()
    publish(start_tier, kafka_broker, db_url, topic, 100_000, keys=1000, timeout=300)
    drained = time.monotonic() - started
    started = time.monotonic()
    code, doc = cli(tier_env(db_url, kafka_broker.bootstrap, tmp_path), "audit", "--topic", topic, timeout=300)
    audited = time.monotonic() - started
    print(f"100k: published in {drained:.1f} s, audited in {audited:.1f} s")
    assert code == 0, doc
    assert doc["clean"] is True and doc["rows"] == doc["equal"] == 100_000
    assert doc["partitions"] == PARTITIONS and doc["unverifiable"] == doc["relocated"] == 0
    assert all(doc["findings"][kind]["count"] == 0 for kind in doc["findings"])


@LARGE
def test_exactly_the_rows_marked_by_hand_are_missing_and_the_records_produced_again_duplicated(
        db_url, kafka_broker, admin, start_tier, tmp_path):
    topic = create_topic(admin, f"audit-{uuid.uuid4().hex[:8]}")
    _, ids = publish(start_tier, kafka_broker, db_url, topic, 300, keys=30)
    env = tier_env(db_url, kafka_broker.bootstrap, tmp_path)
    code, doc = cli(env, "audit")
    assert (code, doc["clean"], doc["equal"]) == (0, True, 300), doc

    with psycopg.connect(db_url, autocommit=True) as conn:
        positions = dict((r[0], (r[1], r[2])) for r in conn.execute(
            "SELECT id, published_partition, published_offset FROM outbox_events"))
    # Missing: one at an offset that holds another event, one past its partition's end, one in a
    # partition of its own range only; none of them ever produced.
    held = positions[ids[10]]
    missing = mark_by_hand(db_url, topic, [held, (held[0], 1_000_000), ((held[0] + 1) % PARTITIONS, 500_000)],
                           tag="by hand")
    # Duplicates: three published events produced again, one of them twice, with their event-ids.
    copied = [ids[3], ids[150], ids[299]]
    originals = [read_back(kafka_broker.bootstrap, topic, *positions[i]) for i in copied]
    produce(kafka_broker.bootstrap, [{"topic": topic, "partition": m.partition(), "key": m.key(), "value": m.value(),
                                      "headers": m.headers()} for m in originals + originals[:1]])

    code, doc = cli(env, "audit")
    assert code == 10, doc
    assert finding_ids(doc, "missing") == set(missing)
    assert finding_ids(doc, "duplicated") == set(copied)
    assert doc["findings"]["duplicated"]["extraCopies"] == 4
    assert {e["id"]: e["copies"] for e in doc["findings"]["duplicated"]["events"]} == \
        {copied[0]: 3, copied[1]: 2, copied[2]: 2}
    assert doc["findings"]["altered"]["count"] == doc["findings"]["outOfOrder"]["count"] == 0
    assert doc["equal"] == 300 and doc["rows"] == 303


def test_a_keys_records_produced_out_of_order_are_reported(db_url, kafka_broker, admin, start_tier, tmp_path):
    topic = create_topic(admin, f"audit-{uuid.uuid4().hex[:8]}")
    publish(start_tier, kafka_broker, db_url, topic, 60, keys=6)
    # Three events of one key, committed already published in one transaction (their table order:
    # first, second, third), then produced to one partition as third, first, second.
    with psycopg.connect(db_url) as conn:
        first, second, third = enqueue_many(conn, [Event(topic, "late-key", {"n": n}) for n in range(3)])
        conn.execute("UPDATE outbox_events SET status = 'published', published_at = clock_timestamp() "
                     "WHERE id = ANY(%s)", ([first, second, third],))
        conn.commit()
        rows = {r[0]: r[1] for r in conn.execute(
            "SELECT id, coalesce(payload_bytes, convert_to(payload::text, 'UTF8')) FROM outbox_events "
            "WHERE id = ANY(%s)",
            ([first, second, third],))}
    wrong_order = [third, first, second]
    landed = produce(kafka_broker.bootstrap, [
        {"topic": topic, "partition": 1, "key": b"late-key", "value": rows[i], "headers": [("event-id", b"%d" % i)]}
        for i in wrong_order])
    with psycopg.connect(db_url, autocommit=True) as conn:
        for event_id, (partition, offset) in zip(wrong_order, landed, strict=True):
            conn.execute("UPDATE outbox_events SET published_partition = %s, published_offset = %s WHERE id = %s",
                         (partition, offset, event_id))

    code, doc = cli(tier_env(db_url, kafka_broker.bootstrap, tmp_path), "audit", "--topic", topic)
    assert code == 10, doc
    out_of_order = doc["findings"]["outOfOrder"]["events"]
    assert [e["id"] for e in out_of_order] == [first, second]
    assert {(e["key"], e["after"]) for e in out_of_order} == {("late-key", third)}
    assert doc["findings"]["missing"]["count"] == doc["findings"]["duplicated"]["count"] == 0
    assert doc["findings"]["altered"]["count"] == 0 and doc["equal"] == 63

    # On a terminal, a progress bar on stderr (stdout keeps the document); not otherwise (run_cli: pipes).
    env = tier_env(db_url, kafka_broker.bootstrap, tmp_path)
    bar = on_terminal(["audit", "--topic", topic], env)
    assert bar.returncode == 10 and "audit  [" in bar.stderr and "100%" in bar.stderr, bar.stderr
    assert bar.stdout.splitlines()[-1].startswith("audit: 2 findings: 63 events checked in 3 partitions")
    piped = run_cli("audit", "--topic", topic, env=env)
    assert piped.returncode == 10 and "100%" not in piped.stderr

    since = run_cli("audit", "--since", "1h", "--until", "2999-01-01T00:00:00", "--topic", "no-such-topic", "--json",
                    env=tier_env(db_url, kafka_broker.bootstrap, tmp_path))
    assert since.returncode == 0 and orjson.loads(since.stdout)["rows"] == 0  # an empty window is clean


def test_locate_finds_a_byte_equal_record_and_says_when_it_differs(db_url, kafka_broker, admin, start_tier,
                                                                   tmp_path):
    topic = create_topic(admin, f"locate-{uuid.uuid4().hex[:8]}")
    tier = start_tier(bootstrap=kafka_broker.bootstrap)
    [text_id, bytes_id, tombstone_id] = helpers.commit(db_url, [
        Event(topic, "k1", {"b": 2, "a": [1, "\u00e9"]}),
        Event(topic, b"\x00\xffkey", b"\x00\x01\xfe\xff raw"),
        Event(topic, "k1", None)])
    wait_all_published(db_url, 3, 60, "3 events published")
    env = tier_env(db_url, kafka_broker.bootstrap, tmp_path)

    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, coalesce(payload_bytes, convert_to(payload::text, 'UTF8')), "
            "coalesce(partition_key_bytes, convert_to(partition_key, 'UTF8')), published_partition, published_offset "
            "FROM outbox_events")}
    for event_id in (text_id, bytes_id, tombstone_id):
        code, doc = cli(env, "locate", str(event_id))
        value, key, partition, offset = rows[event_id]
        assert code == 0 and doc["result"] == "equal", doc
        assert (doc["status"], doc["topic"], doc["position"]) == \
            ("published", topic, {"partition": partition, "offset": offset})
        assert doc["broker"]["record"]["eventId"] == event_id
        msg = read_back(kafka_broker.bootstrap, topic, partition, offset)  # what locate compared, byte for byte
        assert (msg.value(), msg.key()) == (value, key)
    assert rows[tombstone_id][0] is None

    text = run_cli("locate", str(text_id), env=env)
    assert text.returncode == 0 and f"landed {topic}[{rows[text_id][2]}]@{rows[text_id][3]}" in text.stdout
    assert "broker: equal" in text.stdout

    # The same event at another offset with another value, the row pointed at it: differs.
    value, key, partition, _ = rows[text_id]
    [(_, altered_at)] = produce(kafka_broker.bootstrap, [{
        "topic": topic, "partition": partition, "key": key, "value": value + b" ",
        "headers": [("event-id", b"%d" % text_id)]}])
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE outbox_events SET published_offset = %s WHERE id = %s", (altered_at, text_id))
    code, doc = cli(env, "locate", str(text_id))
    assert (code, doc["result"], doc["broker"]["differs"]) == (14, "differs", ["value"]), doc

    # Missing: the recorded offset holds another event; past the partition's end.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE outbox_events SET published_partition = %s, published_offset = %s WHERE id = %s",
                     (rows[tombstone_id][2], rows[tombstone_id][3], bytes_id))
    code, doc = cli(env, "locate", str(bytes_id))
    assert (code, doc["result"]) == (13, "missing on the broker"), doc
    assert doc["broker"]["reason"] == f"offset {rows[tombstone_id][3]} holds event {tombstone_id}"
    [hand] = mark_by_hand(db_url, topic, [(0, 10_000)], tag="by hand")
    code, doc = cli(env, "locate", str(hand))
    assert (code, doc["result"]) == (13, "missing on the broker") and "not stored" in doc["broker"]["reason"]

    # No position recorded; not published; no such row.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE outbox_events SET published_offset = NULL WHERE id = %s", (tombstone_id,))
    assert cli(env, "locate", str(tombstone_id))[0] == 12
    tier.stop()
    [pending] = helpers.commit(db_url, [Event(topic, "k9", {"later": True})])
    code, doc = cli(env, "locate", str(pending))
    assert (code, doc["status"], doc["result"]) == (11, "pending", "not published")
    assert cli(env, "locate", str(pending + 1000))[0] == 10


@LARGE
def test_a_topic_lost_after_10k_events_is_flagged_and_after_replay_the_audit_is_clean(
        db_url, kafka_broker, admin, start_tier, tmp_path: Path):
    topic = create_topic(admin, f"audit-lost-{uuid.uuid4().hex[:8]}")
    tier, ids = publish(start_tier, kafka_broker, db_url, topic, 10_000, keys=100, timeout=120)
    tier.stop()
    env = tier_env(db_url, kafka_broker.bootstrap, tmp_path)
    assert cli(env, "audit", "--topic", topic)[0] == 0

    # The broker loses the topic: deleted, then created again, empty.
    admin.delete_topics([topic])[topic].result(30)
    wait_for(lambda: topic not in admin.list_topics(timeout=5).topics, 60, f"{topic} deleted")
    wait_for(lambda: _created(admin, topic), 60, f"{topic} created again")

    code, doc = cli(env, "audit", "--topic", topic)
    assert code == 10, doc
    assert doc["findings"]["missing"]["count"] == 10_000 and doc["equal"] == 0

    replayed = run_cli("replay", "--topic", topic, "--rate", "0", "--yes", env=env, timeout=300)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    code, doc = cli(env, "audit", "--topic", topic)
    assert code == 0, doc
    assert doc["clean"] is True and doc["equal"] == 10_000


def _created(admin: AdminClient, topic: str) -> bool:
    try:
        create_topic(admin, topic)
    except Exception:  # noqa: BLE001 - the deletion may still be under way on a node: try again
        return False
    return True


def test_on_a_compacted_topic_events_the_broker_compacted_away_are_not_missing(db_url, kafka_broker, admin,
                                                                                start_tier, tmp_path):
    """A compacted topic (README: tombstones, compacted topics) loses superseded records by design:
    the broker removes an event once a later one of its key follows. The audit reads the topic's
    cleanup.policy and counts such a gap `compacted`, not missing; a gap whose key has no later
    record (a row marked by hand at a compacted-away offset) is still missing, exactly that one."""
    topic = f"audit-compact-{uuid.uuid4().hex[:8]}"
    replication = min(3, len(admin.list_topics(timeout=10).brokers))
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=replication, config={
        "cleanup.policy": "compact", "segment.ms": "100", "min.cleanable.dirty.ratio": "0.001",
        "min.compaction.lag.ms": "0"})])[topic].result(30)
    tier, ids = publish(start_tier, kafka_broker, db_url, topic, 4, keys=2)  # key-0: ids 0 and 2; key-1: 1 and 3
    tier.stop()
    with psycopg.connect(db_url, autocommit=True) as conn:
        offsets = dict(conn.execute("SELECT id, published_offset FROM outbox_events WHERE id = ANY(%s)",
                                    (ids,)).fetchall())
    superseded = {offsets[ids[0]], offsets[ids[1]]}

    # The broker's log cleaner runs every 15 s (log.cleaner.backoff.ms) on the segments no longer
    # active: records of another key roll the segment, until the superseded offsets are gone.
    filler = Producer({"bootstrap.servers": kafka_broker.bootstrap, "log_level": 0})
    consumer_env = {"bootstrap.servers": kafka_broker.bootstrap}

    def compacted_away() -> bool:
        filler.produce(topic, b"f", b"filler")
        filler.flush(10)
        with RecordReader(consumer_env) as reader:
            stored = {r.offset for r in reader.read_range(topic, 0, 0, max(offsets.values()) + 1, timeout=10)}
        return not stored & superseded
    wait_for(compacted_away, 90, f"offsets {sorted(superseded)} compacted away", interval=1)
    [lost] = mark_by_hand(db_url, topic, [(0, offsets[ids[0]])], tag="lost")  # key hand-0: no later record

    env = tier_env(db_url, kafka_broker.bootstrap, tmp_path)
    code, doc = cli(env, "audit", "--topic", topic)
    assert code == 10, doc
    assert finding_ids(doc, "missing") == {lost} and doc["findings"]["missing"]["count"] == 1
    assert doc["compacted"] == 2 and doc["equal"] == 2
    assert all(doc["findings"][kind]["count"] == 0 for kind in ("altered", "duplicated", "outOfOrder"))
    text = run_cli("audit", "--topic", topic, env=env)
    assert text.returncode == 10 and "2 compacted" in text.stdout.splitlines()[-1]
