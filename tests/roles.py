"""Three database roles on the test server, as README "Database roles" sets them up: an owner that
runs `migrate` (and owns a database of its own), a runtime role for the tier and a read-only one,
each given what `kaireon-pub grants` prints. Roles are cluster-wide: each set has fresh names and
is dropped, with its database, at the end.

TIER_ROLES parametrizes an e2e test by the role its tier runs as (`tier_role`; the `tier_db`
fixture of tests/e2e/conftest.py gives the test's database as a TierDatabase): the superuser, and
the runtime role without pg_read_all_stats (least privilege: another role's `xact_start` hidden).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql

from kaireon_pub.db.migrate import migrate
from kaireon_pub.ops.grants import statements

NOT_VIA_PGBOUNCER = ("the session's PgBouncer knows one user (its userlist): these roles log in to the "
                     "server directly")
TIER_ROLES = ("superuser", pytest.param("runtime", marks=[
    pytest.mark.not_via_pgbouncer(NOT_VIA_PGBOUNCER),
    pytest.mark.broker_agnostic("the tier's database role is the database's")]))


@dataclass(frozen=True)
class TierDatabase:
    """A test's outbox database and who does what in it. As the superuser (`single`) every URL is
    the one database URL; as the runtime role, the application is the owner (a role of its own,
    another role than the tier's), the tier the runtime role, `status`/`check` the read-only one."""
    role: str  # "superuser" or "runtime": the role the tier runs as
    url: str  # the superuser's: the test's own reads and the faults it makes
    app_url: str  # the application's: its events and its open transactions
    tier_url: str  # `kaireon-pub run`'s
    ops_url: str  # `status` and `check`'s

    @classmethod
    def single(cls, url: str) -> TierDatabase:
        return cls("superuser", url, url, url, url)


@dataclass
class Roles:
    pg: object
    partitioning: str = "none"
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def owner(self) -> str:
        return f"kp_owner_{self.tag}"

    @property
    def runtime(self) -> str:
        return f"kp_runtime_{self.tag}"

    @property
    def readonly(self) -> str:
        return f"kp_readonly_{self.tag}"

    @property
    def database(self) -> str:
        return f"kaireon_r_{self.tag}"

    def url(self, role: str | None = None) -> str:
        """The database's URL as `role` (the server's superuser when None)."""
        url = self.pg.url(self.database)
        return url if role is None else psycopg.conninfo.make_conninfo(url, user=role)

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.url(), autocommit=True)

    def tier_database(self) -> TierDatabase:
        return TierDatabase("runtime", self.url(), self.url(self.owner), self.url(self.runtime),
                            self.url(self.readonly))

    def create(self, *, migrate_schema: bool = True, **grant_options: object) -> Roles:
        with psycopg.connect(self.pg.admin_url, autocommit=True) as conn:
            for role in (self.owner, self.runtime, self.readonly):
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(self.database),
                                                                       sql.Identifier(self.owner)))
        if migrate_schema:
            with psycopg.connect(self.url(self.owner), autocommit=True) as conn:
                migrate(conn, partitioning=self.partitioning)
            self.grant(**grant_options)
        return self

    def grant(self, **options: object) -> None:
        """Apply `kaireon-pub grants` for the runtime and the read-only role, as the superuser."""
        with self.admin() as conn:
            conn.execute(statements(self.runtime, "runtime", **options))
            conn.execute(statements(self.readonly, "readonly", **options))

    def drop(self) -> None:
        with psycopg.connect(self.pg.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.database)))
            for role in (self.runtime, self.readonly, self.owner):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))

    def __enter__(self) -> Roles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop()
