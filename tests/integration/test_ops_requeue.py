"""`kaireon-pub requeue`: exactly the selected failed rows move; the tier then publishes them."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests import helpers


def insert(db: psycopg.Connection, topic: str, key: str | None = None) -> int:
    return db.execute("INSERT INTO outbox_events (topic, partition_key, payload) VALUES (%s, %s, '{}') RETURNING id",
                      (topic, key)).fetchone()[0]


def fail(db: psycopg.Connection, ids: list[int], error: str, attempts: int = 10) -> None:
    db.execute("UPDATE outbox_events SET status = 'failed', attempts = %s, last_error = %s, "
               "next_attempt_at = clock_timestamp() + interval '1 hour' WHERE id = ANY(%s)", (attempts, error, ids))


def rows(db: psycopg.Connection) -> dict[int, tuple]:
    return {r[0]: r[1:] for r in db.execute(
        "SELECT id, status, attempts, next_attempt_at = '-infinity' FROM outbox_events ORDER BY id")}


@pytest.fixture
def failed(db) -> dict[str, int]:
    ids = {
        "big_orders": insert(db, "orders"), "big_audit": insert(db, "audit"),
        "unknown": insert(db, "orders"), "pending": insert(db, "orders"), "published": insert(db, "orders"),
    }
    fail(db, [ids["big_orders"], ids["big_audit"]], "KafkaError: Broker: Message size too large")
    fail(db, [ids["unknown"]], "KafkaError: Broker: Unknown topic or partition", attempts=3)
    db.execute("UPDATE outbox_events SET status = 'published', published_at = clock_timestamp() WHERE id = %s",
               (ids["published"],))
    return ids


def audit_lines(stderr: str) -> list[dict]:
    """The JSON log lines of event "requeue" (the --all prompt shares stderr)."""
    lines = [json.loads(raw) for raw in stderr.splitlines() if raw.startswith("{")]
    return [line for line in lines if line.get("event") == "requeue"]


@pytest.fixture
def env(db_url, tmp_path) -> dict[str, str]:
    return helpers.tier_env(db_url, "", tmp_path)


def test_dry_run_counts_and_moves_nothing(db, failed, env):
    before = rows(db)
    done = helpers.run_cli("requeue", "--error-contains", "MESSAGE SIZE", "--dry-run", env=env)
    assert done.returncode == 0, done.stderr
    assert f"would requeue 2 failed events (ids {failed['big_orders']}, {failed['big_audit']})" in done.stdout
    assert rows(db) == before
    (line,) = audit_lines(done.stderr)
    assert line["dryRun"] is True and line["matched"] == 2 and line["requeued"] == 0
    assert line["selection"] == {"errorContains": "MESSAGE SIZE"} and line["operator"]


def test_requeue_by_error_text_moves_exactly_those_rows(db, failed, env):
    db.execute("LISTEN kaireon_outbox_rescan")
    before = rows(db)
    done = helpers.run_cli("requeue", "--error-contains", "message size", env=env)
    assert done.returncode == 0, done.stderr
    assert "requeued 2 failed events to pending" in done.stdout
    after = rows(db)
    for name in ("big_orders", "big_audit"):
        assert after[failed[name]] == ("pending", 0, True), name  # attempts reset, due at once
    assert {k: v for k, v in after.items() if k not in (failed["big_orders"], failed["big_audit"])} == \
        {k: v for k, v in before.items() if k not in (failed["big_orders"], failed["big_audit"])}
    # The workers are told to look behind their cursors.
    notes = list(db.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in notes] == ["kaireon_outbox_rescan"]
    (line,) = audit_lines(done.stderr)
    assert line["requeued"] == 2 and sorted(line["eventIds"]) == sorted([failed["big_orders"], failed["big_audit"]])


@pytest.mark.parametrize("args,moved", [
    (["--id", "{unknown}"], ["unknown"]),
    (["--id", "{unknown}", "--id", "{pending}", "--id", "{big_audit}"], ["unknown", "big_audit"]),
    (["--topic", "orders"], ["big_orders", "unknown"]),
    (["--topic", "orders", "--error-contains", "unknown topic"], ["unknown"]),
    (["--topic", "nope"], []),
])
def test_selection_by_id_and_topic(db, failed, env, args, moved):
    before = rows(db)
    done = helpers.run_cli("requeue", *(a.format(**failed) for a in args), env=env)
    assert done.returncode == 0, done.stderr
    after = rows(db)
    changed = sorted(i for i in after if after[i] != before[i])
    assert changed == sorted(failed[name] for name in moved)
    assert all(after[i][0] == "pending" for i in changed)
    assert len(audit_lines(done.stderr)) == 1


def test_all_needs_a_confirmation(db, failed, env):
    before = rows(db)
    # No answer on stdin: nothing moves.
    done = helpers.run_cli("requeue", "--all", env=env, input="")
    assert done.returncode == 1 and "Requeue ALL 3 failed events" in done.stderr
    assert rows(db) == before
    # "n": nothing moves either.
    done = helpers.run_cli("requeue", "--all", env=env, input="n\n")
    assert done.returncode == 1 and rows(db) == before
    assert audit_lines(done.stderr)[0]["declined"] is True
    # "y" at the prompt: every failed row moves.
    done = helpers.run_cli("requeue", "--all", env=env, input="y\n")
    assert done.returncode == 0, done.stderr
    assert "requeued 3 failed events" in done.stdout
    assert {i for i, r in rows(db).items() if r[0] == "failed"} == set()
    assert len(audit_lines(done.stderr)) == 1


def test_all_with_yes_does_not_ask(db, failed, env):
    done = helpers.run_cli("requeue", "--all", "--yes", env=env, input="")
    assert done.returncode == 0, done.stderr
    assert "Requeue ALL" not in done.stderr
    assert sum(1 for r in rows(db).values() if r[0] == "pending") == 4


@pytest.mark.parametrize("args,message", [
    ([], "say which failed events"),
    (["--all", "--topic", "orders"], "--all cannot be combined"),
    (["--error-contains", "  "], "needs a non-empty text"),
])
def test_bad_selections_are_usage_errors(db, failed, env, args, message):
    before = rows(db)
    done = helpers.run_cli("requeue", *args, env=env)
    assert done.returncode == 2 and message in done.stderr
    assert rows(db) == before


def test_the_tier_publishes_requeued_events(db_url, db, broker, topic, tmp_path, run_tier):
    """The failed rows sit behind the worker's cursor: requeue's NOTIFY makes it look back."""
    ids = [insert(db, topic, "same-key") for _ in range(3)]
    fail(db, ids[:2], "KafkaError: Broker: Request timed out")
    # A periodic full rescan far away: only the NOTIFY can bring the worker back to these rows.
    env = helpers.tier_env(db_url, broker.bootstrap, tmp_path, OUTBOX_RESCAN_INTERVAL_MS="3600000")
    tier = run_tier(env)
    reader = helpers.TopicReader(broker.bootstrap, topic)
    try:
        reader.read_count(1, timeout=30)
        assert helpers.event_ids(reader.messages) == [ids[2]]
        done = helpers.run_cli("requeue", "--topic", topic, env=env)
        assert done.returncode == 0, done.stderr
        reader.read_count(3, timeout=20)
        assert sorted(helpers.event_ids(reader.messages)) == sorted(ids)
        helpers.wait_for(lambda: helpers.status_counts(db_url) == {"published": 3}, 10, "all rows published")
    finally:
        reader.close()
        tier.stop()
