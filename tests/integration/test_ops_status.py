"""`kaireon-pub status` and the backlog gauges on a real PostgreSQL with rows in every status."""

from __future__ import annotations

import asyncio
import json
import uuid

import psycopg
import pytest
from prometheus_client import REGISTRY

from kaireon_pub.ops import status as ops_status
from kaireon_pub.ops.gauges import refresh_backlog_gauges
from tests import helpers


def insert(db: psycopg.Connection, topic: str, key: str | None, n: int = 1) -> list[int]:
    """n events, each in its own transaction (autocommit), so each has its own xid."""
    return [db.execute("INSERT INTO outbox_events (topic, partition_key, payload) VALUES (%s, %s, '{}') RETURNING id",
                       (topic, key)).fetchone()[0] for _ in range(n)]


@pytest.fixture
def mixed(db) -> dict[str, object]:
    """5 pending (the first an hour old), 2 processing, 4 published (3 in the last minute), 4 failed."""
    pending = insert(db, "orders", "k-old") + [insert(db, "orders", f"k-{i}")[0] for i in range(4)]
    db.execute("UPDATE outbox_events SET created_at = clock_timestamp() - interval '1 hour' WHERE id = %s",
               (pending[0],))
    processing = insert(db, "orders", None, 2)
    db.execute("UPDATE outbox_events SET status = 'processing' WHERE id = ANY(%s)", (processing,))
    published = insert(db, "orders", None, 4)
    db.execute("UPDATE outbox_events SET status = 'published', published_at = clock_timestamp() WHERE id = ANY(%s)",
               (published,))
    db.execute("UPDATE outbox_events SET published_at = clock_timestamp() - interval '5 minutes' WHERE id = %s",
               (published[0],))
    too_large = insert(db, "orders", None, 3)
    unknown = insert(db, "audit", None, 1)
    db.execute("UPDATE outbox_events SET status = 'failed', attempts = 10, last_error = %s WHERE id = ANY(%s)",
               ("Broker: Message size too large", too_large))
    db.execute("UPDATE outbox_events SET status = 'failed', attempts = 1, last_error = %s WHERE id = ANY(%s)",
               ("Broker: Unknown topic or partition", unknown))
    # A worker holding 10 shard leases, and two reaper runs.
    worker = uuid.uuid4()
    db.execute("INSERT INTO outbox_workers (worker_id, hostname, pid, slot, expires_at) "
               "VALUES (%s, 'pod-a', 4242, 0, clock_timestamp() + interval '1 minute')", (worker,))
    db.execute("UPDATE outbox_shard_leases SET owner = %s, epoch = 1, "
               "expires_at = clock_timestamp() + interval '1 minute' WHERE shard < 10", (worker,))
    db.execute("INSERT INTO outbox_reaper_runs (source, reset_count, duration_ms) "
               "VALUES ('http', 2, 14), ('cli', 0, 3)")
    return {"pending": pending, "too_large": too_large, "unknown": unknown, "worker": worker}


def test_status_reports_every_figure(db, mixed):
    doc = ops_status.collect(db)

    counts = {name: f["count"] for name, f in doc["backlog"].items()}
    assert counts == {"pending": 5, "processing": 2, "published": 4, "failed": 4}
    assert not any(f["estimate"] or f["atLeast"] for f in doc["backlog"].values())
    assert doc["estimates"] == []
    assert doc["oldestPending"]["eventId"] == mixed["pending"][0]
    assert 3500 < doc["oldestPending"]["ageSeconds"] < 3700
    assert doc["publishedLastMinute"]["count"] == 3

    lagging = doc["laggingShards"]
    assert lagging[0]["oldestEventId"] == mixed["pending"][0]
    assert [s["oldestAgeSeconds"] for s in lagging] == sorted((s["oldestAgeSeconds"] for s in lagging), reverse=True)
    assert sum(s["pending"]["count"] for s in lagging) == 5  # 5 pending rows, at most 5 shards

    failed = doc["failed"]
    assert failed["count"] == 4
    by_error = {e["error"]: e for e in failed["byError"]}
    assert by_error["Broker: Message size too large"]["count"] == 3
    assert by_error["Broker: Message size too large"]["topics"] == ["orders"]
    assert by_error["Broker: Unknown topic or partition"]["topics"] == ["audit"]
    assert failed["byError"][0]["error"] == "Broker: Unknown topic or partition"  # newest first

    shards = doc["shards"]
    assert (shards["owned"], shards["unowned"], shards["liveWorkers"]) == (10, 246, 1)
    (owner,) = shards["owners"]
    assert ((owner["workerId"], owner["shards"], owner["hostname"], owner["pid"])
            == (str(mixed["worker"]), 10, "pod-a", 4242))

    reaper = doc["reaper"]
    assert (reaper["runsLastHour"], reaper["resetLastHour"]) == (2, 2)
    assert [r["source"] for r in reaper["recent"]] == ["cli", "http"]


def test_status_cli_text_and_json(db_url, mixed, tmp_path):
    env = helpers.tier_env(db_url, "", tmp_path)
    done = helpers.run_cli("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert {n: f["count"] for n, f in doc["backlog"].items()} == {"pending": 5, "processing": 2,
                                                                  "published": 4, "failed": 4}

    done = helpers.run_cli("status", env=env)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for line in ("pending     5", "processing  2", "published   4", "failed      4",
                 "published in the last minute: 3", "Failed events: 4", "'Broker: Message size too large'",
                 "Shards: 10 owned, 246 without a live lease; 1 live workers", "pod-a pid 4242 slot 0",
                 "Reaper: 2 runs and 2 rows reset in the last hour"):
        assert line in text, f"{line!r} not in:\n{text}"
    assert "oldest pending: 60.0 min" in text or "oldest pending: 1.0 h" in text, text


def test_status_marks_counts_above_the_cap_as_estimates(db, mixed, monkeypatch):
    monkeypatch.setattr(ops_status, "STATUS_CAP", 3)
    # Never analyzed: only the cap is known.
    doc = ops_status.collect(db)
    assert doc["backlog"]["pending"] == {"count": 3, "estimate": False, "atLeast": True}
    assert doc["backlog"]["processing"] == {"count": 2, "estimate": False, "atLeast": False}
    assert "backlog.pending" in doc["estimates"] and "backlog.processing" not in doc["estimates"]
    assert ">= 3" in ops_status.render(doc)
    # After ANALYZE: the planner's estimate (exact here, the sample is the whole table).
    db.execute("ANALYZE outbox_events")
    doc = ops_status.collect(db)
    assert doc["backlog"]["pending"] == {"count": 5, "estimate": True, "atLeast": False}
    assert doc["backlog"]["failed"] == {"count": 4, "estimate": True, "atLeast": False}
    assert "~5 (estimate)" in ops_status.render(doc)


def test_status_on_an_empty_outbox(db):
    doc = ops_status.collect(db)
    assert all(f["count"] == 0 for f in doc["backlog"].values())
    assert doc["oldestPending"] is None and doc["laggingShards"] == []
    assert "oldest pending: none" in ops_status.render(doc)


def test_status_cli_fails_cleanly_when_the_database_is_unreachable(tmp_path):
    env = helpers.tier_env("postgresql://kaireon:pw-s3cret-x@127.0.0.1:1/nope", "", tmp_path)
    done = helpers.run_cli("status", env=env)
    assert done.returncode == 1
    (line,) = [json.loads(raw) for raw in done.stderr.splitlines() if '"status failed"' in raw]
    assert line["errorId"] and line["errorType"] == "OperationalError"
    assert "pw-s3cret-x" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_backlog_gauges_follow_the_table(db_url, db, mixed):
    async def refresh() -> None:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await refresh_backlog_gauges(conn)

    asyncio.run(refresh())
    assert 3500 < gauge("kaireon_outbox_oldest_pending_age_seconds") < 3700
    assert gauge("kaireon_outbox_failed_count") == 4
    groups = {g: gauge("kaireon_outbox_pending_by_shard_group", group=str(g)) for g in range(16)}
    assert sum(groups.values()) == 5
    shard = db.execute("SELECT shard FROM outbox_events WHERE id = %s", (mixed["pending"][0],)).fetchone()[0]
    old_group = str(shard // 16)
    assert gauge("kaireon_outbox_oldest_pending_age_by_shard_group_seconds", group=old_group) > 3500
    assert all(gauge("kaireon_outbox_oldest_pending_age_by_shard_group_seconds", group=str(g)) < 60
               for g in range(16) if str(g) != old_group)

    # Everything published or requeued away: the gauges drop back.
    db.execute("UPDATE outbox_events SET status = 'published', published_at = clock_timestamp()")
    asyncio.run(refresh())
    assert gauge("kaireon_outbox_oldest_pending_age_seconds") == 0
    assert gauge("kaireon_outbox_failed_count") == 0
    assert all(gauge("kaireon_outbox_pending_by_shard_group", group=str(g)) == 0 for g in range(16))


def test_backlog_gauges_survive_a_database_error(db_url, caplog):
    """A failing query is logged with an errorId and does not raise into the worker's tick."""
    async def refresh_on_broken() -> None:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute("ALTER TABLE outbox_events RENAME TO outbox_events_gone")
            await refresh_backlog_gauges(conn)

    with caplog.at_level("WARNING", logger="kaireon_pub.ops.gauges"):
        asyncio.run(refresh_on_broken())
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "backlog gauges failed"]
    assert record.errorId and record.errorType == "UndefinedTable"
