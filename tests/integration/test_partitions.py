"""The partitioned outbox (kaireon_pub.db.partitions) on the real PostgreSQL (18 embedded, or 15)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import psycopg
import pytest

from kaireon_pub import enqueue
from kaireon_pub.db import migrate as migrations
from kaireon_pub.db import partitions as parts

RETENTION = dict(retention_seconds=60, failed_retention_seconds=3600)


@pytest.fixture
def pdb(pdb_url):
    with psycopg.connect(pdb_url, autocommit=True) as conn:
        yield conn


def old_partition(conn, name: str, lower: str, upper: str) -> parts.Partition:
    conn.execute(parts._q(parts.P.create_partition, partition=name))
    conn.execute(f"ALTER TABLE outbox_events ATTACH PARTITION {name} FOR VALUES FROM ('{lower}') TO ('{upper}')")
    return next(p for p in parts.list_partitions(conn) if p.name == name)


def insert_old(conn, created_at: str, status: str = "pending", **columns) -> int:
    extra = {"published_at": "2020-01-01 00:30+00"} if status == "published" else {}
    extra.update(columns)
    names = ", ".join(["topic", "payload", "created_at", "status", *extra])
    values = ", ".join(["%s"] * (4 + len(extra)))
    return conn.execute(f"INSERT INTO outbox_events ({names}) VALUES ({values}) RETURNING id",
                        ["t", '{"a": 1}', created_at, status, *extra.values()]).fetchone()[0]


def names(conn) -> list[str]:
    return [p.name for p in parts.list_partitions(conn)]


def test_a_fresh_database_is_partitioned_with_partitions_ahead_and_migrates_again_cleanly(pdb):
    assert parts.is_partitioned(pdb)
    found = parts.list_partitions(pdb)
    now = pdb.execute("SELECT clock_timestamp()").fetchone()[0]
    assert len(found) == 1 + parts.AHEAD["hourly"]
    assert found[0].lower <= now < found[0].upper
    assert all(b.lower == a.upper and b.upper - b.lower == timedelta(hours=1)
               for a, b in zip(found, found[1:], strict=False))
    assert migrations.migrate(pdb, partitioning="hourly") == []  # checksums of the partitioned flavour
    assert migrations.migrate(pdb) == []  # the database says which flavour it is, not the setting
    assert parts.create_ahead(pdb, "hourly") == []  # nothing twice
    pdb.autocommit = False
    event_id = enqueue(pdb, topic="t", key="k", payload=b"x")
    pdb.commit()
    pdb.autocommit = True
    where = pdb.execute("SELECT tableoid::regclass::text FROM outbox_events WHERE id = %s", (event_id,)).fetchone()[0]
    assert where == found[0].name


def test_the_plain_table_stays_the_default(db):
    assert not parts.is_partitioned(db)
    assert migrations.flavour(db, "hourly") == "plain"  # an existing plain table is never changed


def test_a_partition_with_one_pending_row_is_never_dropped_however_old(pdb):
    keep = old_partition(pdb, "outbox_events_p2020010100", "2020-01-01 00:00+00", "2020-01-01 01:00+00")
    for _ in range(100):
        insert_old(pdb, "2020-01-01 00:10+00", "published")
    pending = insert_old(pdb, "2020-01-01 00:20+00", "pending")
    report = parts.maintain(pdb, interval="hourly", **RETENTION)
    assert keep.name in names(pdb) and report.kept[keep.name] == "it holds pending rows"
    pdb.execute("UPDATE outbox_events SET status = 'processing' WHERE id = %s", (pending,))
    report = parts.maintain(pdb, interval="hourly", retention_seconds=1, failed_retention_seconds=1)
    assert keep.name in names(pdb) and report.kept[keep.name] == "it holds processing rows"
    # even with every retention at its shortest, and a retirement already under way
    pdb.execute(parts._q(parts.P.retire_partition, partition=keep.name))
    pdb.execute("ALTER TABLE outbox_events_p2020010100 DROP CONSTRAINT outbox_events_retiring")
    pdb.execute("UPDATE outbox_events SET status = 'published', published_at = '2020-01-01 00:30+00' WHERE id = %s",
                (pending,))
    report = parts.maintain(pdb, interval="hourly", **RETENTION)
    assert keep.name not in names(pdb) and keep.name in report.dropped
    assert pdb.execute("SELECT count(*) FROM outbox_events WHERE created_at < '2021-01-01'").fetchone()[0] == 0


def test_a_fully_published_partition_is_dropped_once_its_retention_passed(pdb):
    old_partition(pdb, "outbox_events_p2020010100", "2020-01-01 00:00+00", "2020-01-01 01:00+00")
    insert_old(pdb, "2020-01-01 00:10+00", "published")
    recent = insert_old(pdb, "2020-01-01 00:11+00", "published")
    pdb.execute("UPDATE outbox_events SET published_at = clock_timestamp() WHERE id = %s", (recent,))
    report = parts.maintain(pdb, interval="hourly", **RETENTION)
    assert report.kept["outbox_events_p2020010100"] == "rows published within OUTBOX_RETENTION_SECONDS"
    assert parts.maintain(pdb, interval="hourly", retention_seconds=0, failed_retention_seconds=1).dropped == []
    time.sleep(1.1)  # the retention of 1 s itself, not a wait for anything
    dry = parts.maintain(pdb, interval="hourly", retention_seconds=1, failed_retention_seconds=1, dry_run=True)
    assert dry.dropped == ["outbox_events_p2020010100"] and "outbox_events_p2020010100" in names(pdb)
    report = parts.maintain(pdb, interval="hourly", retention_seconds=1, failed_retention_seconds=1)
    assert report.dropped == ["outbox_events_p2020010100"] and "outbox_events_p2020010100" not in names(pdb)
    assert not pdb.execute("SELECT to_regclass('outbox_events_p2020010100')").fetchone()[0]


def test_failed_rows_keep_their_partition_for_their_own_retention(pdb):
    old_partition(pdb, "outbox_events_p2020010100", "2020-01-01 00:00+00", "2020-01-01 01:00+00")
    insert_old(pdb, "2020-01-01 00:10+00", "published")
    failed = insert_old(pdb, "2020-01-01 00:11+00", "failed", updated_at="2020-01-01 00:12+00")
    assert parts.maintain(pdb, interval="hourly", retention_seconds=60, failed_retention_seconds=0).kept[
        "outbox_events_p2020010100"].startswith("it holds failed rows")
    pdb.execute("UPDATE outbox_events SET updated_at = clock_timestamp() WHERE id = %s", (failed,))
    assert parts.maintain(pdb, interval="hourly", **RETENTION).kept[
        "outbox_events_p2020010100"] == "rows failed within OUTBOX_FAILED_RETENTION_SECONDS"
    assert parts.maintain(pdb, interval="hourly", retention_seconds=60, failed_retention_seconds=1,
                          dry_run=True).dropped == []  # 1 s has not passed yet
    pdb.execute("UPDATE outbox_events SET updated_at = clock_timestamp() - interval '2 s' WHERE id = %s", (failed,))
    assert parts.maintain(pdb, interval="hourly", retention_seconds=60, failed_retention_seconds=1).dropped == [
        "outbox_events_p2020010100"]


def test_a_row_committed_into_the_partition_while_it_is_retired_keeps_it(pdb, pdb_url):
    """A restore writing an old created_at into a partition that looked droppable: the freeze waits
    for that transaction, then sees its row, and the partition stays."""
    p = old_partition(pdb, "outbox_events_p2020010100", "2020-01-01 00:00+00", "2020-01-01 01:00+00")
    insert_old(pdb, "2020-01-01 00:10+00", "published")
    writer = psycopg.connect(pdb_url)
    insert_old(writer, "2020-01-01 00:20+00", "pending")  # not committed yet: invisible to the first look
    timer = threading.Timer(0.5, writer.commit)
    timer.start()
    try:
        reason = None
        try:
            reason = parts.retire(pdb, p, **RETENTION)
        except parts._Keep as keep:
            reason = keep.reason
        assert reason == "it holds pending rows"
    finally:
        timer.join(5)
        writer.close()
    assert p.name in names(pdb)
    assert not next(q for q in parts.list_partitions(pdb) if q.name == p.name).retiring  # rolled back
    assert pdb.execute("SELECT count(*) FROM outbox_events WHERE status = 'pending'").fetchone()[0] == 1


def test_a_retiring_partition_refuses_new_rows_loudly(pdb):
    old_partition(pdb, "outbox_events_p2020010100", "2020-01-01 00:00+00", "2020-01-01 01:00+00")
    pdb.execute(parts._q(parts.P.retire_partition, partition="outbox_events_p2020010100"))
    with pytest.raises(psycopg.errors.CheckViolation):
        insert_old(pdb, "2020-01-01 00:20+00", "pending")
    parts.maintain(pdb, interval="hourly", **RETENTION)  # empty: dropped
    with pytest.raises(psycopg.errors.CheckViolation):  # no partition takes the row any more
        insert_old(pdb, "2020-01-01 00:20+00", "pending")


def test_an_interrupted_detach_is_finished_on_the_next_round(pdb, pdb_url):
    p = old_partition(pdb, "outbox_events_p2020010100", "2020-01-01 00:00+00", "2020-01-01 01:00+00")
    insert_old(pdb, "2020-01-01 00:10+00", "published")
    pdb.execute(parts._q(parts.P.retire_partition, partition=p.name))
    holder = psycopg.connect(pdb_url)  # an old snapshot that sees the partition: the detach waits for it
    holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    holder.execute("SELECT count(*) FROM outbox_events").fetchone()
    pdb.execute("SET statement_timeout = 500")
    with pytest.raises(psycopg.errors.QueryCanceled):
        pdb.execute(parts._q(parts.P.detach_partition, partition=p.name))
    pdb.execute("RESET statement_timeout")
    holder.rollback()
    holder.close()
    assert next(q for q in parts.list_partitions(pdb) if q.name == p.name).detach_pending
    assert parts.maintain(pdb, interval="hourly", **RETENTION).dropped == [p.name]
    assert p.name not in names(pdb)


def test_the_claim_reads_every_partition_in_xid_id_order(pdb):
    """Rows of one key on both sides of a partition boundary come out in (xid, id) order."""
    floor = parts.floor(pdb.execute("SELECT clock_timestamp()").fetchone()[0], "hourly")
    previous = parts.partition_name(floor - timedelta(hours=1), "hourly")
    pdb.execute(parts._q(parts.P.create_partition, partition=previous))
    pdb.execute(parts._q(parts.P.attach_partition, partition=previous, lower=floor - timedelta(hours=1), upper=floor))
    ids = []
    for i in range(6):
        at = floor - timedelta(milliseconds=1) if i % 2 == 0 else floor + timedelta(milliseconds=1)
        ids.append(insert_old(pdb, at.isoformat(), "pending", partition_key="k"))
    where = [r[0] for r in pdb.execute("SELECT tableoid::regclass::text FROM outbox_events ORDER BY id")]
    assert len(set(where)) == 2
    rows = pdb.execute("SELECT id FROM outbox_events WHERE status = 'pending' AND shard = "
                       "(SELECT shard FROM outbox_events LIMIT 1) ORDER BY xid, id").fetchall()
    assert [r[0] for r in rows] == ids
