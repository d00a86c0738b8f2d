"""Versioned, idempotent migrations: the SQL files in db/migrations, applied in order, once each.

How one `migrate` run goes:
- `SET statement_timeout = 0`: a migration may run as long as it needs (the tier's own sessions
  keep their statement timeout). The connection must be in autocommit mode.
- A session-level advisory lock serializes concurrent runs (several pods starting at once). The
  wait for it is bounded by `lock_timeout_seconds`: past it, `MigrationLockTimeout` names the
  session holding the lock. The lock is held across every file and released at the end.
- Each file runs in its own transaction together with its row in kaireon_schema_migrations: a
  file that fails leaves the files before it applied and itself not at all.
- A file whose first line is `-- kaireon:no-transaction` runs outside any transaction, one
  statement at a time (CREATE INDEX CONCURRENTLY needs that); its row is written after its last
  statement. Such a file must be safe to run again from the start (IF NOT EXISTS; for
  CONCURRENTLY, a DROP INDEX CONCURRENTLY IF EXISTS first, since a failed build leaves an
  invalid index behind).
- The partitioned outbox (OUTBOX_PARTITIONING=hourly|daily, `partitioning=`): on a database without
  the outbox, the files of migrations/partitioned/ replace their namesakes (0001: the table
  partitioned on created_at; 0004: its index without CONCURRENTLY), then the partitions from the
  current one ahead are made (kaireon_pub.db.partitions). Which flavour a database has is read from
  the database afterwards (outbox_events a partitioned table or not), whatever the setting says:
  an existing plain table stays plain (converting it is a documented procedure, after which the
  files it applied in their plain flavour are accepted as applied).
The `migrate` command and the report of a database not migrated are kaireon_pub.ops.migrate.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources

import psycopg
import psycopg.errors

log = logging.getLogger("kaireon_pub.db.migrate")

_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x6B6169726F6E  # "kairon": one advisory lock id for the migrator
NO_TRANSACTION_MARKER = "-- kaireon:no-transaction"
DEFAULT_LOCK_TIMEOUT_SECONDS = 300.0
MIGRATE_HINT = "run `kaireon-pub migrate`"

BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS kaireon_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class MigrationError(Exception):
    """A migration run could not go on; the message is one line for the operator."""


class MigrationLockTimeout(MigrationError):
    """Another session held the migration lock for longer than the lock timeout."""


class SchemaNotReady(Exception):
    """The database schema is missing or older than this version's migrations."""

    def __init__(self, current: int | None, expected: int):
        self.current = current
        self.expected = expected
        if current is None:
            found = "the database has no kaireon-pub schema"
        else:
            found = f"the database schema is at version {current}, this kaireon-pub needs version {expected}"
        super().__init__(f"{found}: {MIGRATE_HINT}")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        first_line = self.sql.lstrip("\ufeff").split("\n", 1)[0].strip()
        return first_line != NO_TRANSACTION_MARKER


@dataclass(frozen=True)
class Applied:
    migration: Migration
    seconds: float


def available(flavour: str = "plain") -> list[Migration]:
    """The migration files; `flavour="partitioned"` puts migrations/partitioned/'s in their place."""
    def read(folder) -> dict[int, Migration]:
        found = {}
        for entry in folder.iterdir():
            match = _FILE.match(entry.name)
            if match:
                found[int(match["version"])] = Migration(int(match["version"]), match["name"], entry.read_text())
        return found

    folder = resources.files("kaireon_pub.db").joinpath("migrations")
    found = read(folder)
    if flavour == "partitioned":
        found.update(read(folder.joinpath("partitioned")))
    return sorted(found.values(), key=lambda m: m.version)


def flavour(conn: psycopg.Connection, partitioning: str = "none") -> str:
    """`partitioned` when outbox_events is a partitioned table, `plain` when it is a plain one; on a
    database without it, what OUTBOX_PARTITIONING asks for."""
    kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass('outbox_events')").fetchone()
    if kind is not None:
        return "partitioned" if kind[0] == "p" else "plain"
    return "plain" if partitioning in ("none", "", None) else "partitioned"


def expected_version() -> int:
    return available()[-1].version


def current_version(conn: psycopg.Connection) -> int | None:
    exists = conn.execute("SELECT to_regclass('kaireon_schema_migrations') IS NOT NULL").fetchone()[0]
    if not exists:
        return None
    row = conn.execute("SELECT max(version) FROM kaireon_schema_migrations").fetchone()
    return row[0]


def require_current(conn: psycopg.Connection) -> int:
    """The schema version, or `SchemaNotReady` when it is missing or older than the code's.

    A newer database (a later release migrated it first) is accepted: migrations only add.
    """
    expected = expected_version()
    current = current_version(conn)
    if current is None or current < expected:
        raise SchemaNotReady(current, expected)
    return current


def pending(conn: psycopg.Connection) -> list[Migration]:
    """The migrations not applied yet (without taking the lock or creating anything)."""
    if current_version(conn) is None:
        return available()
    done = {row[0] for row in conn.execute("SELECT version FROM kaireon_schema_migrations")}
    return [m for m in available() if m.version not in done]


def migrate(conn: psycopg.Connection, *, lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
            migrations: Iterable[Migration] | None = None,
            on_applied: Callable[[Applied], None] | None = None,
            partitioning: str = "none",
            on_partitions: Callable[[list[str]], None] | None = None) -> list[Migration]:
    """Apply what is missing; returns the migrations applied now (empty when up to date).

    `on_applied` is called after each file commits (a long run shows its progress).
    `partitioning` (OUTBOX_PARTITIONING) chooses the flavour of a fresh database; on a partitioned
    one the partitions ahead are made at the end (`on_partitions` gets the names made).
    """
    if not conn.autocommit:
        raise MigrationError("migrate needs a connection in autocommit mode (each file is its own transaction)")
    conn.execute("SET statement_timeout = 0")
    _lock(conn, lock_timeout_seconds)
    try:
        kind = flavour(conn, partitioning)
        if migrations is None:
            migrations = available() if kind == "plain" else available(kind)
        todo = sorted(migrations, key=lambda m: m.version)
        conn.execute(BOOKKEEPING)
        done = dict(conn.execute("SELECT version, checksum FROM kaireon_schema_migrations").fetchall())
        # A table converted to the partitioned one (docs/operations.md) was migrated as a plain one:
        # the plain flavour of a file that has a partitioned one is what was applied there.
        plain = {m.version: m.checksum for m in available()} if kind == "partitioned" else {}
        applied_now = []
        for migration in todo:
            if migration.version in done:
                if done[migration.version] not in (migration.checksum, plain.get(migration.version)):
                    raise MigrationError(f"migration {migration.label} was changed after it was applied "
                                         "(restore the file; add a new migration instead)")
                continue
            started = time.monotonic()
            _apply(conn, migration)
            applied_now.append(migration)
            if on_applied is not None:
                on_applied(Applied(migration, time.monotonic() - started))
        if kind == "partitioned" and flavour(conn) == "partitioned":
            from kaireon_pub.db import partitions

            made = partitions.create_ahead(conn, partitions.infer_interval(partitions.list_partitions(conn),
                                                                           partitioning))
            if on_partitions is not None:
                on_partitions(made)
        return applied_now
    finally:
        _unlock(conn)


def _apply(conn: psycopg.Connection, migration: Migration) -> None:
    record = ("INSERT INTO kaireon_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
              (migration.version, migration.name, migration.checksum))
    try:
        if migration.transactional:
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute(*record)
        else:
            for statement in split_statements(migration.sql):
                conn.execute(statement)
            conn.execute(*record)
    except psycopg.Error as exc:
        kept = "" if migration.transactional else " (no-transaction file: statements before the failing one stay)"
        raise MigrationError(f"migration {migration.label} failed{kept}: "
                             f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from exc


def _lock(conn: psycopg.Connection, timeout_seconds: float) -> None:
    """The session-level advisory lock, waiting at most `timeout_seconds` (lock_timeout)."""
    conn.execute(f"SET lock_timeout = {max(1, round(timeout_seconds * 1000))}")
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    except psycopg.errors.LockNotAvailable:
        holder = _lock_holder(conn)
        raise MigrationLockTimeout(
            f"another migrate ({holder}) held the migration lock for more than {timeout_seconds:g} s; "
            "nothing was applied: retry once it has finished, or raise --lock-timeout") from None
    finally:
        if not conn.closed:
            conn.execute("RESET lock_timeout")


def _unlock(conn: psycopg.Connection) -> None:
    # A broken session cannot unlock, and need not: its end releases the lock.
    if not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        with contextlib.suppress(psycopg.OperationalError):
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


def _lock_holder(conn: psycopg.Connection) -> str:
    # A bigint advisory key is held as (classid = high 32 bits, objid = low 32 bits, objsubid 1).
    row = conn.execute(
        """SELECT a.pid, a.application_name, a.client_addr::text,
                  round(extract(epoch FROM clock_timestamp() - a.backend_start))::bigint
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
             AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid
           LIMIT 1""",
        (_LOCK_KEY >> 32, _LOCK_KEY & 0xFFFFFFFF)).fetchone()
    if row is None:
        return "a session that has let go of it since"
    pid, application, address, connected = row
    where = f" from {address}" if address else ""
    return f"backend pid {pid}, {application or 'no application_name'}{where}, connected {connected} s ago"


def split_statements(sql: str) -> list[str]:
    """The statements of a SQL file, split on `;` outside quotes, comments and dollar quotes."""
    statements, start, i, n = [], 0, 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            i = _end(sql, "\n", i + 2)
        elif c == "/" and sql.startswith("/*", i):
            i = _end(sql, "*/", i + 2)
        elif c in ("'", '"'):
            i = _end(sql, c, i + 1)  # a doubled quote inside reads as two adjacent literals: same split
        elif c == "$" and (m := re.match(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$", sql[i:])):
            i = _end(sql, m.group(0), i + len(m.group(0)))
        elif c == ";":
            statements.append(sql[start:i])
            i += 1
            start = i
        else:
            i += 1
    statements.append(sql[start:])
    return [s.strip() for s in statements if _has_code(s)]


def _end(sql: str, closing: str, start: int) -> int:
    found = sql.find(closing, start)
    return len(sql) if found < 0 else found + len(closing)


def _has_code(statement: str) -> bool:
    without_comments = re.sub(r"--[^\n]*|/\*.*?\*/", "", statement, flags=re.S)
    return bool(without_comments.strip())
