"""`kaireon-pub check` with DATABASE_URL given as a file (DATABASE_URL_FILE), as the tier takes it:
its database checks reach the database the file names (they read DATABASE_URL themselves)."""

from __future__ import annotations

import psycopg

from kaireon_pub.ops.check import run_checks


def test_check_reaches_the_database_of_database_url_file(db_url, tmp_path):
    url_file = tmp_path / "database_url"
    url_file.write_text(db_url + "\n")  # the trailing newline a mounted Secret has
    with psycopg.connect(db_url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
    env = {"DATABASE_URL_FILE": str(url_file), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}  # no broker: not this test's

    checks = {r.name: r for r in run_checks(env, auto_create=False).results}

    assert checks["settings"].status == "ok", checks["settings"].detail
    assert checks["database"].status == "ok", checks["database"].detail
    assert checks["database"].detail.endswith(f"(PostgreSQL {version})")
    assert checks["pooler"].status == "ok", checks["pooler"].detail
    assert checks["schema"].status == "ok", checks["schema"].detail
