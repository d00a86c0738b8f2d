"""`kaireon-pub migrate`: versioned, idempotent, one transaction per file, a bounded lock wait."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from kaireon_pub.db import migrate as migrations
from kaireon_pub.db.connect import connect
from kaireon_pub.db.migrate import Migration, expected_version, migrate
from kaireon_pub.settings import Settings
from tests.helpers import run_cli, tier_env, wait_for

LOCK_KEY = 0x6B6169726F6E  # the migrator's advisory lock id


def schema_snapshot(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        """SELECT table_name, column_name, data_type, column_default
           FROM information_schema.columns WHERE table_schema = 'public'
           UNION ALL
           SELECT tablename, indexname, indexdef, NULL FROM pg_indexes WHERE schemaname = 'public'
           ORDER BY 1, 2"""
    ).fetchall()


def versions(conn: psycopg.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT version FROM kaireon_schema_migrations ORDER BY version")]


def exists(conn: psycopg.Connection, relation: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,)).fetchone()[0]


@pytest.fixture
def empty_db(pg):
    name = f"kaireon_mig_{uuid.uuid4().hex[:8]}"
    url = pg.create_database(name)
    yield url
    pg.drop_database(name)


@pytest.fixture
def extra(monkeypatch):
    """extra(*migrations): the packaged migrations followed by these (a temporary directory's worth)."""
    packaged = migrations.available()

    def add(*more: Migration) -> list[Migration]:
        monkeypatch.setattr(migrations, "available", lambda: [*packaged, *more])
        return [*packaged, *more]

    return add


def test_migrate_twice_changes_nothing(empty_db, tmp_path):
    env = tier_env(empty_db, "127.0.0.1:1", tmp_path)
    first = run_cli("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "applied migration 0001_outbox_events" in first.stderr  # the JSON log line
    assert first.stdout.splitlines()[0].startswith("applied 0001_outbox_events in ")
    count = len(migrations.available())
    assert first.stdout.splitlines()[-1] == (
        f"schema is at version {expected_version()} ({count} migration{'s' if count > 1 else ''} applied)")
    assert len(first.stdout.splitlines()) == count + 1  # one line per file, then the version
    with psycopg.connect(empty_db, autocommit=True) as conn:
        before = schema_snapshot(conn)
        applied = versions(conn)
    second = run_cli("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout == f"schema is up to date (version {expected_version()})\n"
    assert "schema is up to date" in second.stderr
    with psycopg.connect(empty_db, autocommit=True) as conn:
        assert schema_snapshot(conn) == before
        assert versions(conn) == applied
        assert migrate(conn) == []
        assert max(versions(conn)) == expected_version()


def test_migrate_check_says_whether_migrations_are_pending(empty_db, tmp_path):
    env = tier_env(empty_db, "127.0.0.1:1", tmp_path)
    before = run_cli("migrate", "--check", env=env)
    assert before.returncode == 5, before.stderr
    assert "migrate --check: the database has no kaireon-pub schema: run `kaireon-pub migrate`" in before.stderr
    with psycopg.connect(empty_db, autocommit=True) as conn:
        assert not exists(conn, "kaireon_schema_migrations")  # --check creates nothing
    assert run_cli("migrate", env=env).returncode == 0
    after = run_cli("migrate", "--check", env=env)
    assert (after.returncode, after.stdout) == (0, f"schema is up to date (version {expected_version()})\n")


def test_a_failing_file_leaves_the_earlier_files_applied(db, extra):
    extra(Migration(9001, "first", "CREATE TABLE mig_first (x int); INSERT INTO mig_first VALUES (1);"),
          Migration(9002, "broken", "CREATE TABLE mig_broken (x int); SELECT 1 / 0;"),
          Migration(9003, "after", "CREATE TABLE mig_after (x int);"))
    with pytest.raises(migrations.MigrationError, match="migration 9002_broken failed: DivisionByZero"):
        migrate(db)
    assert versions(db)[-1] == 9001
    assert exists(db, "mig_first") and db.execute("SELECT x FROM mig_first").fetchall() == [(1,)]
    assert not exists(db, "mig_broken")  # its own transaction rolled back, all of it
    assert not exists(db, "mig_after")  # nothing runs after a failure
    assert db.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]  # the lock was let go


def test_a_no_transaction_file_can_create_an_index_concurrently(db, extra):
    sql = """-- kaireon:no-transaction
-- a comment; with a semicolon
DROP INDEX CONCURRENTLY IF EXISTS outbox_events_topic_idx;
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_events_topic_idx ON outbox_events (topic);
"""
    extra(Migration(9001, "topic_index", sql))
    assert [m.version for m in migrate(db)] == [9001]
    valid = db.execute("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = 'outbox_events_topic_idx'::regclass"
                       ).fetchone()
    assert valid == (True,)
    assert versions(db)[-1] == 9001


def test_without_the_marker_a_concurrent_index_fails_and_records_nothing(db, extra):
    extra(Migration(9001, "topic_index", "CREATE INDEX CONCURRENTLY outbox_events_topic_idx ON outbox_events (topic);"))
    with pytest.raises(migrations.MigrationError, match="9001_topic_index failed"):
        migrate(db)
    assert 9001 not in versions(db)


def test_no_statement_timeout_while_migrating(db_url, tmp_path, extra):
    extra(Migration(9001, "slow", "SELECT pg_sleep(0.6);"))
    settings = Settings.from_env({"DATABASE_URL": db_url, "OUTBOX_STATEMENT_TIMEOUT_MS": "200",
                                  "OUTBOX_LIVENESS_FILE": str(tmp_path / "alive")}, need_kafka=False)
    with connect(settings, "migrate") as conn:  # the tier's session options: statement_timeout 200 ms
        assert [m.version for m in migrate(conn)] == [9001]


def test_a_second_migrate_fails_clearly_after_its_lock_timeout(db_url, tmp_path):
    env = tier_env(db_url, "127.0.0.1:1", tmp_path)
    with psycopg.connect(db_url, autocommit=True, application_name="other-migrate") as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        holder_pid = holder.info.backend_pid
        started = time.monotonic()
        done = run_cli("migrate", "--lock-timeout", "1", env=env, timeout=60)
        waited = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert (f"migrate failed: another migrate (backend pid {holder_pid}, other-migrate"
            in done.stderr)
    assert "held the migration lock for more than 1 s; nothing was applied" in done.stderr
    assert waited >= 1.0


def test_a_second_migrate_waits_for_the_first_then_finds_nothing_to_do(db_url, extra):
    # The first run holds the lock across its files: it is paused inside its second file.
    extra(Migration(9001, "one", "CREATE TABLE mig_one (x int);"),
          Migration(9002, "two", "SELECT pg_advisory_lock(424242); SELECT pg_advisory_unlock(424242);"))
    results: dict[str, object] = {}

    def run(name: str) -> None:
        with psycopg.connect(db_url, autocommit=True, application_name=f"mig-{name}") as conn:
            results[name] = [m.version for m in migrate(conn, lock_timeout_seconds=30)]

    with psycopg.connect(db_url, autocommit=True) as blocker:
        blocker.execute("SELECT pg_advisory_lock(424242)")
        first = threading.Thread(target=run, args=("first",))
        first.start()
        wait_for(lambda: lock_waiters(blocker, "mig-first"), 20, "the first migrate inside its second file")
        second = threading.Thread(target=run, args=("second",))
        second.start()
        wait_for(lambda: lock_waiters(blocker, "mig-second"), 20, "the second migrate waiting for the lock")
        blocker.execute("SELECT pg_advisory_unlock(424242)")
        first.join(30)
        second.join(30)
    assert results == {"first": [9001, 9002], "second": []}


def lock_waiters(conn: psycopg.Connection, application: str) -> bool:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                        "AND wait_event_type = 'Lock'", (application,)).fetchone()[0] > 0


def test_a_changed_file_is_refused(db, monkeypatch):
    first = migrations.available()[0]
    edited = Migration(first.version, first.name, first.sql + "\n-- edited\n")
    monkeypatch.setattr(migrations, "available", lambda: [edited])
    with pytest.raises(migrations.MigrationError, match=f"{first.label} was changed after it was applied"):
        migrate(db)
