"""Versioned, idempotent migrations: the SQL files in db/migrations, applied in order, once each.

An advisory lock makes concurrent `migrate` runs (several pods starting at once) safe; each file
runs in its own transaction together with its row in kaireon_schema_migrations.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x6B6169726F6E  # "kairon": one advisory lock id for the migrator

BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS kaireon_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    folder = resources.files("kaireon_pub.db").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match["version"]), match["name"], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def expected_version() -> int:
    return available()[-1].version


def current_version(conn: psycopg.Connection) -> int | None:
    exists = conn.execute("SELECT to_regclass('kaireon_schema_migrations') IS NOT NULL").fetchone()[0]
    if not exists:
        return None
    row = conn.execute("SELECT max(version) FROM kaireon_schema_migrations").fetchone()
    return row[0]


def migrate(conn: psycopg.Connection) -> list[Migration]:
    """Apply what is missing; returns the migrations applied now (empty when up to date)."""
    applied_now = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(BOOKKEEPING)
        done = {
            version: checksum
            for version, checksum in conn.execute("SELECT version, checksum FROM kaireon_schema_migrations")
        }
        for migration in available():
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise RuntimeError(
                        f"migration {migration.version:04d}_{migration.name} was changed after it was applied"
                    )
                continue
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO kaireon_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration)
    return applied_now
