"""`kaireon-pub migrate`: versioned and idempotent."""

import psycopg

from kaireon_pub.db.migrate import expected_version, migrate
from tests.helpers import run_cli, tier_env


def schema_snapshot(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        """SELECT table_name, column_name, data_type, column_default
           FROM information_schema.columns WHERE table_schema = 'public'
           UNION ALL
           SELECT tablename, indexname, indexdef, NULL FROM pg_indexes WHERE schemaname = 'public'
           ORDER BY 1, 2"""
    ).fetchall()


def test_migrate_twice_changes_nothing(pg, tmp_path):
    url = pg.create_database("kaireon_migrate_twice")
    try:
        env = tier_env(url, "127.0.0.1:1", tmp_path)
        first = run_cli("migrate", env=env)
        assert first.returncode == 0, first.stderr
        assert "applied migration 0001_outbox_events" in first.stderr
        with psycopg.connect(url, autocommit=True) as conn:
            before = schema_snapshot(conn)
            versions = conn.execute("SELECT version FROM kaireon_schema_migrations").fetchall()
        second = run_cli("migrate", env=env)
        assert second.returncode == 0, second.stderr
        assert "schema is up to date" in second.stderr
        with psycopg.connect(url, autocommit=True) as conn:
            assert schema_snapshot(conn) == before
            assert conn.execute("SELECT version FROM kaireon_schema_migrations").fetchall() == versions
            assert migrate(conn) == []
            assert conn.execute("SELECT max(version) FROM kaireon_schema_migrations").fetchone()[0] == expected_version()
    finally:
        pg.drop_database("kaireon_migrate_twice")
