"""`kaireon-pub check`: a preflight for an initContainer or a human; every problem, not the first.

Checks, in order: settings valid; producer settings safe for the guarantees; timeouts consistent
(reaper staleness vs message.timeout.ms vs drain, worker timeout vs message.timeout.ms); database
reachable; whether DATABASE_URL points at a pooler (PgBouncer's admin console, a refused `options`
startup parameter, the server's port against the DSN's), whether OUTBOX_POOL_MODE agrees, which
features are off, and whether OUTBOX_LISTEN_DATABASE_URL reaches the same database directly; schema at the expected version with its tables and indexes; broker reachable; topics
exist (those named with --topic and those of a bounded sample of pending rows) unless
auto-creation is allowed. Each check is ok, warn, fail or skip; any fail exits 1, except a schema
that is missing or older than the code's migrations: exit 5 (run `kaireon-pub migrate` first).

The settings are read without exiting on the first invalid one, so that an unsafe KAFKA_ACKS is
reported as a failed check, by name, beside the others. No secret reaches the report.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from kaireon_pub import logs
from kaireon_pub.db import migrate
from kaireon_pub.db.connect import POOLED_SESSION_NAME
from kaireon_pub.errors import ConfigError
from kaireon_pub.ops.sql import OPS
from kaireon_pub.redact import Redactor, secrets_of
from kaireon_pub.settings import (
    DEFAULTS,
    KAFKA_PREFIX,
    PRODUCER_DEFAULTS,
    SAFE_PRODUCER_SETTINGS,
    SETTINGS,
    Settings,
)

log = logging.getLogger("kaireon_pub.ops.check")

TIMEOUT_SECONDS = 5
PENDING_TOPIC_SAMPLE = 10_000
# Producer-only settings an admin client does not need (idempotence would request a producer id).
_ADMIN_EXCLUDED = frozenset(PRODUCER_DEFAULTS) - {"bootstrap.servers"}


@dataclass
class Result:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    schema_missing: bool = False  # the schema is absent or older than the code: exit 5, not 1

    def add(self, name: str, status: str, detail: str) -> Result:
        result = Result(name, status, detail)
        self.results.append(result)
        return result

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status == "fail"]

    def as_json(self) -> dict[str, Any]:
        return {"ok": not self.failed,
                "checks": [{"name": r.name, "status": r.status, "detail": r.detail} for r in self.results]}

    def render(self) -> str:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
        lines = [f"{marks[r.status]}  {r.name:<9} {r.detail}" for r in self.results]
        lines.append(f"check failed: {len(self.failed)} of {len(self.results)} checks failed"
                     if self.failed else f"check passed: {len(self.results)} checks")
        return "\n".join(lines)


def _kafka_env(env: Mapping[str, str]) -> dict[str, str]:
    """librdkafka settings as the tier derives them: defaults overlaid with KAFKA_* variables."""
    config = dict(PRODUCER_DEFAULTS)
    for name, value in env.items():
        if name.startswith(KAFKA_PREFIX):
            config[name[len(KAFKA_PREFIX):].lower().replace("_", ".")] = value
    return config


def _env_name(kafka_key: str) -> str:
    return KAFKA_PREFIX + kafka_key.upper().replace(".", "_")


def _redact(text: str, secrets: list[str]) -> str:
    return Redactor(secrets).text(text)


def _int(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(str(env.get(name, DEFAULTS.get(name)) or "").strip())
    except ValueError:
        return None


def run_checks(env: Mapping[str, str] | None = None, *, topics: tuple[str, ...] = (),
               auto_create: bool | None = None) -> Report:
    """Every check; `auto_create` None asks the broker (auto.create.topics.enable)."""
    env = dict(os.environ if env is None else env)
    secrets = secrets_of(env)
    report = Report()

    settings: Settings | None = None
    try:
        settings = Settings.from_env(env, need_kafka=True)
        report.add("settings", "ok", f"valid ({len(SETTINGS)} settings and {len(settings.producer_config)} "
                                     "producer settings read)")
    except ConfigError as exc:
        report.add("settings", "fail", _redact(str(exc), secrets))

    kafka = dict(settings.producer_config) if settings else _kafka_env(env)
    _check_producer(report, kafka)
    _check_timeouts(report, env, settings, kafka)

    conn, refused_options = _check_database(report, env, secrets)
    pending_topics: list[str] = []
    if conn is None:
        report.add("pooler", "skip", "database unreachable")
        report.add("schema", "skip", "database unreachable")
    else:
        with conn:
            _check_pooler(report, env, settings, conn, refused_options, secrets)
            if _check_schema(report, conn):
                pending_topics = [r[0] for r in conn.execute(OPS.pending_topics_sample,
                                                             {"limit": PENDING_TOPIC_SAMPLE}).fetchall()]
                _check_horizon(report, conn, settings.horizon_max_wait_ms if settings else 5000)
    _check_broker_and_topics(report, kafka, secrets, topics, pending_topics, auto_create)
    for r in report.results:
        if r.status == "fail":
            log.error(f"check {r.name} failed: {r.detail}",
                      extra={"event": "check failed", "check": r.name, "detail": r.detail})
    return report


def _check_producer(report: Report, kafka: Mapping[str, str]) -> None:
    unsafe = []
    for key, accepted in SAFE_PRODUCER_SETTINGS.items():
        value = str(kafka.get(key, "")).strip().lower()
        if value not in accepted:
            unsafe.append(f"{_env_name(key)}={value!r} ({key}; accepted: {' | '.join(sorted(accepted))})")
    if unsafe:
        report.add("producer", "fail", "unsafe for at-least-once, in-order delivery: " + "; ".join(unsafe))
    else:
        report.add("producer", "ok", "enable.idempotence=true, acks=" + str(kafka.get("acks")))


def _check_timeouts(report: Report, env: Mapping[str, str], settings: Settings | None,
                    kafka: Mapping[str, str]) -> None:
    if settings is not None:
        staleness, drain_ms = settings.reaper_staleness_seconds, settings.shutdown_drain_timeout_ms
        worker_timeout, timeout_ms = settings.worker_timeout_seconds, settings.message_timeout_ms
    else:
        staleness = _int(env, "OUTBOX_REAPER_STALENESS_SECONDS")
        drain_ms = _int(env, "OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS")
        worker_timeout = _int(env, "OUTBOX_WORKER_TIMEOUT_SECONDS")
        try:
            timeout_ms = int(str(kafka.get("message.timeout.ms")))
        except ValueError:
            timeout_ms = None
    if None in (staleness, drain_ms, worker_timeout, timeout_ms):
        report.add("timeouts", "skip", "a timeout setting is not an integer (see settings)")
        return
    problems = []
    floor = (timeout_ms + drain_ms) / 1000
    if staleness <= floor:
        problems.append(f"OUTBOX_REAPER_STALENESS_SECONDS={staleness} must be above KAFKA_MESSAGE_TIMEOUT_MS "
                        f"{timeout_ms / 1000:g} s + OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS {drain_ms / 1000:g} s "
                        "(else the reaper resets rows librdkafka may still deliver: duplicates)")
    if worker_timeout * 1000 <= timeout_ms:
        problems.append(f"OUTBOX_WORKER_TIMEOUT_SECONDS={worker_timeout} must be above KAFKA_MESSAGE_TIMEOUT_MS "
                        f"{timeout_ms / 1000:g} s (else a slow batch gets its worker killed)")
    if problems:
        report.add("timeouts", "fail", "; ".join(problems))
    else:
        report.add("timeouts", "ok", f"reaper staleness {staleness} s > message.timeout.ms {timeout_ms / 1000:g} s "
                                     f"+ drain {drain_ms / 1000:g} s; worker timeout {worker_timeout} s > "
                                     f"message.timeout.ms")


def _where(dsn: str) -> str:
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DATABASE_URL)"
    return f"{info.get('host') or 'local socket'}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


def _check_database(report: Report, env: Mapping[str, str],
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
        report.add("database", "fail", f"unreachable at {_where(dsn)}: {_redact(str(exc).strip(), secrets)}")
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


def _check_pooler(report: Report, env: Mapping[str, str], settings: Settings | None, conn: psycopg.Connection,
                  refused_options: bool, secrets: list[str]) -> None:
    """Whether DATABASE_URL points at a pooler, whether OUTBOX_POOL_MODE says so, and which
    features are off because of it."""
    dsn = env.get("DATABASE_URL", "").strip()
    mode = settings.pool_mode if settings else str(env.get("OUTBOX_POOL_MODE") or "session").strip().lower()
    poll_ms = settings.poll_interval_ms if settings else _int(env, "OUTBOX_POLL_INTERVAL_MS")
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
            return f"is unreachable at {_where(listen)}: {_redact(str(exc).strip(), secrets)}"
    if there["relayed"] or _pgbouncer_version(listen):
        return f"({_where(listen)}) points at a pooler or proxy too: LISTEN needs a session of the server itself"
    if (there["database"], there["started"]) != (pooled["database"], pooled["started"]):
        return (f"({_where(listen)}) reaches database {there['database']} of another server or database than "
                f"DATABASE_URL ({pooled['database']}): notifications of the outbox would never arrive")
    return None


def expected_objects() -> tuple[set[str], set[str]]:
    """Tables and indexes the migrations leave: created by one file, not dropped by a later one."""
    tables, indexes = set(), set()
    for m in migrate.available():
        sql = re.sub(r"--[^\n]*", "", m.sql)  # a comment may name a statement it does not run
        tables.update(re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", sql))
        indexes.update(re.findall(r"CREATE (?:UNIQUE )?INDEX (?:CONCURRENTLY )?(?:IF NOT EXISTS )?(\w+)", sql))
        tables.difference_update(re.findall(r"DROP TABLE (?:IF EXISTS )?(\w+)", sql))
        indexes.difference_update(re.findall(r"DROP INDEX (?:CONCURRENTLY )?(?:IF EXISTS )?(\w+)", sql))
    return tables, indexes


def _check_schema(report: Report, conn: psycopg.Connection) -> bool:
    expected = migrate.expected_version()
    current = migrate.current_version(conn)
    if current is None or current < expected:
        found = "no schema" if current is None else f"version {current}"
        report.add("schema", "fail", f"{found}: {migrate.MIGRATE_HINT} (expected version {expected})")
        report.schema_missing = True
        return False
    tables, indexes = expected_objects()
    present = {(kind, name) for kind, name in conn.execute(OPS.schema_objects).fetchall()}
    missing = sorted({("table", t) for t in tables} - present) + sorted({("index", i) for i in indexes} - present)
    if missing:
        report.add("schema", "fail", "missing " + ", ".join(f"{k} {n}" for k, n in missing)
                   + " (a manual change? re-create them from kaireon_pub/db/migrations)")
        return False
    newer = f" (the database is newer: {current})" if current > expected else ""
    report.add("schema", "ok", f"version {expected}{newer}; {len(tables)} tables and {len(indexes)} indexes present")
    return True


def _check_horizon(report: Report, conn: psycopg.Connection, max_wait_ms: int) -> None:
    """What holds the claim back: an open transaction of this database (within its bound) or a
    prepared transaction that wrote the outbox; rows restored from another cluster."""
    from kaireon_pub.db.queries import Q
    from kaireon_pub.ops.status import horizon_holders

    horizon = horizon_holders(conn, max_wait_ms)
    foreign = conn.execute(Q.foreign_rows_count).fetchone()[0]
    notes = []
    for h in horizon["heldBy"]:
        who = f"pid {h['pid']}" if "pid" in h else f"prepared transaction {h['gid']!r}"
        age = "?" if h["ageSeconds"] is None else f"{h['ageSeconds']:g} s"
        verb = "was passed over" if h["bypassed"] else "holds the claim"
        notes.append(f"{who} (database {h['database']}, application {h['application'] or '-'}, open {age}) {verb}")
    if foreign:
        notes.append(f"{foreign} pending rows carry transaction ids from another cluster (re-stamped by worker 0)")
    if not notes:
        report.add("horizon", "ok", "no open transaction holds the claim back")
    else:
        report.add("horizon", "warn", "; ".join(notes))


def _check_broker_and_topics(report: Report, kafka: Mapping[str, str], secrets: list[str],
                             named: tuple[str, ...], pending: list[str], auto_create: bool | None) -> None:
    bootstrap = str(kafka.get("bootstrap.servers") or "").strip()
    if not bootstrap:
        report.add("broker", "fail", "KAFKA_BOOTSTRAP_SERVERS is not set")
        report.add("topics", "skip", "broker not configured")
        return
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    config: dict[str, object] = {k: v for k, v in kafka.items() if k not in _ADMIN_EXCLUDED}
    config["logger"] = logs.librdkafka_logger()
    try:
        admin = AdminClient(config)
        # No topic named: a metadata request for every topic, which never auto-creates one.
        metadata = admin.list_topics(timeout=TIMEOUT_SECONDS)
    except (KafkaException, ValueError, TypeError) as exc:
        report.add("broker", "fail", f"unreachable at {bootstrap}: {_redact(str(exc), secrets)}")
        report.add("topics", "skip", "broker unreachable")
        return
    existing = {name for name, t in metadata.topics.items() if t.error is None}
    report.add("broker", "ok", f"reachable at {bootstrap} (brokers: {len(metadata.brokers)}, topics: {len(existing)})")

    wanted = {t: "of pending events" for t in pending} | {t: "named by --topic" for t in named}
    missing = sorted(t for t in wanted if t not in existing)
    if not wanted:
        report.add("topics", "ok", "no topic named and no pending events")
        return
    if not missing:
        report.add("topics", "ok", f"{len(wanted)} topics exist: " + ", ".join(sorted(wanted)))
        return
    source = "--no-auto-create" if auto_create is False else "--auto-create" if auto_create else ""
    if auto_create is None:
        auto_create, source = _broker_auto_create(admin, metadata)
    listed = ", ".join(f"{t} ({wanted[t]})" for t in missing)
    if auto_create is False:
        report.add("topics", "fail", f"missing: {listed}; auto-creation is off ({source}): "
                                     "create them, or events to them fail as unknown topics")
    elif auto_create is True:
        report.add("topics", "ok", f"missing: {listed}; the broker creates them on first use ({source})")
    else:
        report.add("topics", "warn", f"missing: {listed}; whether the broker auto-creates topics is unknown "
                                     "(pass --no-auto-create or --auto-create to decide)")


def _broker_auto_create(admin: Any, metadata: Any) -> tuple[bool | None, str]:
    """The brokers' auto.create.topics.enable, when they answer DescribeConfigs."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    try:
        broker_id = next(iter(metadata.brokers))
        futures = admin.describe_configs([ConfigResource(ResourceType.BROKER, str(broker_id))],
                                         request_timeout=TIMEOUT_SECONDS)
        (future,) = futures.values()
        entry = future.result(timeout=TIMEOUT_SECONDS).get("auto.create.topics.enable")
    except Exception:  # noqa: BLE001 - brokers that do not answer leave the question open
        return None, "the broker did not say"
    if entry is None or entry.value is None:
        return None, "the broker did not say"
    return entry.value.strip().lower() == "true", f"broker auto.create.topics.enable={entry.value}"
