"""Every command on a database that is not migrated (or migrated by an older release) says to
run `kaireon-pub migrate`, in one plain line, and exits 5 (ExitCode.SCHEMA_MISSING)."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from kaireon_pub.db.migrate import expected_version
from kaireon_pub.errors import ExitCode
from tests.helpers import run_cli, tier_env

COMMANDS = {
    "status": ("status",),
    "status --json": ("status", "--json"),
    "reap": ("reap",),
    "requeue": ("requeue", "--all", "--yes"),
    "requeue --dry-run": ("requeue", "--topic", "orders", "--dry-run"),
    "migrate --check": ("migrate", "--check"),
}


@pytest.fixture
def empty_url(pg):
    name = f"kaireon_empty_{uuid.uuid4().hex[:8]}"
    url = pg.create_database(name)
    yield url
    pg.drop_database(name)


@pytest.fixture
def older_url(db_url):
    """A schema as an older release left it: its newest migration not recorded (or, with one
    migration only, recorded as version 0)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM kaireon_schema_migrations WHERE version = %s AND "
                     "(SELECT count(*) FROM kaireon_schema_migrations) > 1", (expected_version(),))
        conn.execute("UPDATE kaireon_schema_migrations SET version = 0 WHERE version = %s", (expected_version(),))
        older = conn.execute("SELECT max(version) FROM kaireon_schema_migrations").fetchone()[0]
    assert older < expected_version()
    return db_url, older


def plain_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line and not line.startswith("{")]


def assert_says_migrate(done, command: str, found: str) -> None:
    assert done.returncode == ExitCode.SCHEMA_MISSING == 5, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert plain_lines(done.stderr) == [f"{command}: {found}: run `kaireon-pub migrate`"]
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any("run `kaireon-pub migrate`" in line["msg"] for line in logged), logged
    assert done.stdout == ""


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_on_an_unmigrated_database_says_to_migrate(name, empty_url, tmp_path):
    done = run_cli(*COMMANDS[name], env=tier_env(empty_url, "127.0.0.1:1", tmp_path))
    assert_says_migrate(done, name.split(" --")[0] if name != "migrate --check" else name,
                        "the database has no kaireon-pub schema")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_on_an_older_schema_says_to_migrate(name, older_url, tmp_path):
    url, older = older_url
    done = run_cli(*COMMANDS[name], env=tier_env(url, "127.0.0.1:1", tmp_path))
    found = (f"the database schema is at version {older}, "
             f"this kaireon-pub needs version {expected_version()}")
    assert_says_migrate(done, name.split(" --")[0] if name != "migrate --check" else name, found)


def test_check_on_an_unmigrated_database_exits_5(empty_url, broker, tmp_path):
    done = run_cli("check", env=tier_env(empty_url, broker.bootstrap, tmp_path))
    assert done.returncode == 5, done.stdout + done.stderr
    (schema,) = [line for line in done.stdout.splitlines() if "schema" in line]
    assert schema.startswith("FAIL") and "no schema: run `kaireon-pub migrate`" in schema


def test_check_on_an_older_schema_exits_5(older_url, broker, tmp_path):
    url, older = older_url
    done = run_cli("check", "--json", env=tier_env(url, broker.bootstrap, tmp_path))
    assert done.returncode == 5, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["schema"]["status"] == "fail"
    assert checks["schema"]["detail"] == (f"version {older}: run `kaireon-pub migrate` "
                                          f"(expected version {expected_version()})")
