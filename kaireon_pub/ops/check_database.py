"""`kaireon-pub check`'s database checks: reachable, and whether DATABASE_URL points at a pooler
(PgBouncer's admin console, a refused `options` startup parameter, the server's port against the
DSN's), whether OUTBOX_POOL_MODE agrees, and whether OUTBOX_LISTEN_DATABASE_URL reaches the same
database directly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

from kaireon_pub.db.connect import POOLED_SESSION_NAME
from kaireon_pub.ops.check_report import TIMEOUT_SECONDS, Report, hide, setting_int
from kaireon_pub.settings import Settings


def _where(dsn: str) -> str:
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DATABASE_URL)"
    return f"{info.get('host') or 'local socket'}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


def check_database(report: Report, env: Mapping[str, str],
                    secrets: list[str]) -> tuple[psycopg.Connection | None, bool]:
    """The connection the later checks use, and whether the server end refused the startup
    parameter `options` (a pooler: PgBouncer answers "unsupported startup parameter")."""
    dsn = env.get("DATABASE_URL", "").strip()
    if not dsn:
        report.add("database", "fail", "DATABASE_URL is not set")
        return None, False
    refused_options = False
    try:
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=TIMEOUT_SECONDS,
                                   application_name="kaireon-pub:check",
                                   options=f"-c statement_timeout={TIMEOUT_SECONDS * 1000}")
        except psycopg.OperationalError as exc:
            if "unsupported startup parameter" not in str(exc):
                raise
            refused_options = True  # a pooler in the way: see the pooler check
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=TIMEOUT_SECONDS,
                                   application_name=POOLED_SESSION_NAME, prepare_threshold=None)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is this check's finding
        report.add("database", "fail", f"unreachable at {_where(dsn)}: {hide(str(exc).strip(), secrets)}")
        return None, refused_options
    version = conn.execute("SHOW server_version").fetchone()[0]
    report.add("database", "ok", f"reachable at {_where(dsn)} (PostgreSQL {version})")
    return conn, refused_options


def _pgbouncer_version(dsn: str) -> str | None:
    """PgBouncer's version when `dsn` points at one: its admin console (database `pgbouncer`)
    answers SHOW VERSION, or refuses this user in words PostgreSQL never uses."""
    try:
        url = psycopg.conninfo.make_conninfo(dsn, dbname="pgbouncer")
        with psycopg.connect(url, autocommit=True, connect_timeout=TIMEOUT_SECONDS,
                             application_name=POOLED_SESSION_NAME, prepare_threshold=None) as conn:
            return str(conn.execute("SHOW VERSION").fetchone()[0])
    except psycopg.Error as exc:
        text = str(exc)
        if "not allowed" in text or "no such database: pgbouncer" in text or "pgbouncer cannot connect" in text:
            return "PgBouncer"
        return None
    except Exception:  # noqa: BLE001 - a probe that cannot tell says nothing
        return None


def _endpoint(conn: psycopg.Connection, dsn: str) -> dict[str, Any]:
    """Where the DSN points and what answers behind it: the DSN's port against the server's."""
    row = conn.execute("SELECT inet_server_port(), current_setting('port'), current_database(), "
                       "pg_postmaster_start_time()::text").fetchone()
    server_port, configured_port, database, started = row
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(info.get("host") or "")
    tcp = bool(host) and not host.startswith("/")
    dsn_port = int(str(info.get("port") or 5432).split(",")[0])
    # Over TCP the server sees the port the client dialled, unless something relays the connection
    # (a pooler, a proxy); a server reached by a relay over a unix socket has no inet port at all.
    relayed = tcp and server_port != dsn_port
    return {"relayed": relayed, "dsn_port": dsn_port, "server_port": server_port or f"socket, port {configured_port}",
            "database": database, "started": started}


def check_pooler(report: Report, env: Mapping[str, str], settings: Settings | None, conn: psycopg.Connection,
                  refused_options: bool, secrets: list[str]) -> None:
    """Whether DATABASE_URL points at a pooler, whether OUTBOX_POOL_MODE says so, and which
    features are off because of it."""
    dsn = env.get("DATABASE_URL", "").strip()
    mode = settings.pool_mode if settings else str(env.get("OUTBOX_POOL_MODE") or "session").strip().lower()
    poll_ms = settings.poll_interval_ms if settings else setting_int(env, "OUTBOX_POLL_INTERVAL_MS")
    listen = (settings.listen_database_url if settings else str(env.get("OUTBOX_LISTEN_DATABASE_URL") or "")).strip()
    here = _endpoint(conn, dsn)
    bouncer = _pgbouncer_version(dsn) if (here["relayed"] or refused_options) else None
    pooler = bouncer or ("a pooler" if refused_options else "a pooler or proxy" if here["relayed"] else None)
    where = f"{_where(dsn)} -> server port {here['server_port']}"
    if pooler is None:
        if mode == "transaction":
            report.add("pooler", "warn", f"OUTBOX_POOL_MODE=transaction, but DATABASE_URL seems to reach PostgreSQL "
                                         f"itself ({where}): prepared statements are off"
                                         + ("" if listen else " and the workers poll instead of LISTEN")
                                         + " for nothing; set OUTBOX_POOL_MODE=session")
        else:
            report.add("pooler", "ok", f"DATABASE_URL reaches PostgreSQL itself ({where}): LISTEN/NOTIFY, prepared "
                                       "statements and session settings on")
        return
    if mode != "transaction":
        if refused_options:
            report.add("pooler", "fail", f"DATABASE_URL points at {pooler} ({where}), which refuses the startup "
                                         "parameter `options` the workers send in session mode: set "
                                         "OUTBOX_POOL_MODE=transaction (and OUTBOX_LISTEN_DATABASE_URL to the server "
                                         "itself for LISTEN)")
        else:
            report.add("pooler", "warn", f"DATABASE_URL points at {pooler} ({where}); if it pools transactions "
                                         "(PgBouncer pool_mode=transaction), set OUTBOX_POOL_MODE=transaction: in "
                                         "session mode a LISTEN through it is lost and the session settings would "
                                         "stay on server connections other clients get")
        return
    off = ("server-side prepared statements off; session settings (statement_timeout, "
           "idle_in_transaction_session_timeout, synchronous_commit, the workers' session name) set in every "
           "transaction instead of at connect")
    if not listen:
        report.add("pooler", "warn", f"DATABASE_URL points at {pooler} ({where}), OUTBOX_POOL_MODE=transaction: {off}; "
                                     f"LISTEN off: the workers poll every {poll_ms} ms (set OUTBOX_LISTEN_DATABASE_URL "
                                     "to the server itself for NOTIFY wake-ups); `migrate` needs "
                                     "OUTBOX_LISTEN_DATABASE_URL (a session-level advisory lock)")
        return
    problem = _check_listen_url(listen, here, secrets)
    if problem:
        report.add("pooler", "fail", f"DATABASE_URL points at {pooler} ({where}), OUTBOX_POOL_MODE=transaction: {off}; "
                                     f"OUTBOX_LISTEN_DATABASE_URL {problem}")
    else:
        report.add("pooler", "ok", f"DATABASE_URL points at {pooler} ({where}), OUTBOX_POOL_MODE=transaction: {off}; "
                                   f"LISTEN and `migrate` on OUTBOX_LISTEN_DATABASE_URL ({_where(listen)}, the same "
                                   "database, directly)")


def _check_listen_url(listen: str, pooled: dict[str, Any], secrets: list[str]) -> str | None:
    """None when OUTBOX_LISTEN_DATABASE_URL reaches the same database as DATABASE_URL, directly."""
    try:
        with psycopg.connect(listen, autocommit=True, connect_timeout=TIMEOUT_SECONDS,
                             application_name="kaireon-pub:check",
                             options=f"-c statement_timeout={TIMEOUT_SECONDS * 1000}") as conn:
            there = _endpoint(conn, listen)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is this check's finding
        if "unsupported startup parameter" in str(exc):
            there = {"relayed": True}
        else:
            return f"is unreachable at {_where(listen)}: {hide(str(exc).strip(), secrets)}"
    if there["relayed"] or _pgbouncer_version(listen):
        return f"({_where(listen)}) points at a pooler or proxy too: LISTEN needs a session of the server itself"
    if (there["database"], there["started"]) != (pooled["database"], pooled["started"]):
        return (f"({_where(listen)}) reaches database {there['database']} of another server or database than "
                f"DATABASE_URL ({pooled['database']}): notifications of the outbox would never arrive")
    return None
