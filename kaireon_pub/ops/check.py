"""`kaireon-pub check`: a preflight for an initContainer or a human; every problem, not the first.

Checks, in order: settings valid; producer settings safe for the guarantees; timeouts consistent
(reaper staleness vs message.timeout.ms vs drain, worker timeout vs message.timeout.ms); database
reachable; whether DATABASE_URL points at a pooler (PgBouncer's admin console, a refused `options`
startup parameter, the server's port against the DSN's), whether OUTBOX_POOL_MODE agrees, which
features are off, and whether OUTBOX_LISTEN_DATABASE_URL reaches the same database directly;
schema at the expected version with its tables and indexes; what holds the claim back; pending
rows near a shard's head with a key over 1024 bytes (written before migration 0009: their claim
fails for the whole batch of their worker; a warning); broker reachable; topics exist
(those named with --topic and those of a bounded sample of pending rows) unless auto-creation is
allowed. Each check is ok, warn, fail or skip; any fail exits 1, except a schema
that is missing or older than the code's migrations: exit 5 (run `kaireon-pub migrate` first).

The settings are read without exiting on the first invalid one, so that an unsafe KAFKA_ACKS is
reported as a failed check, by name, beside the others. No secret reaches the report.

Here: the order of the checks, and those of the settings and the schema; the database and pooler
checks are check_database.py's, the broker and topic checks check_broker.py's, the report and what
they share check_report.py's.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import psycopg

from kaireon_pub.db import migrate
from kaireon_pub.errors import ConfigError
from kaireon_pub.ops.check_broker import check_broker_and_topics
from kaireon_pub.ops.check_database import check_database, check_pooler
from kaireon_pub.ops.check_report import Report, Result, hide, setting_int
from kaireon_pub.ops.sql import OPS
from kaireon_pub.redact import secrets_of, with_file_values
from kaireon_pub.settings import (
    KAFKA_PREFIX,
    PRODUCER_DEFAULTS,
    SAFE_PRODUCER_SETTINGS,
    SETTINGS,
    Settings,
)

__all__ = ["Report", "Result", "expected_objects", "run_checks"]

log = logging.getLogger("kaireon_pub.ops.check")

PENDING_TOPIC_SAMPLE = 10_000
LONG_KEY_SAMPLE = 100  # pending rows read per shard, from its head, for keys over the limit


def _kafka_env(env: Mapping[str, str]) -> dict[str, str]:
    """librdkafka settings as the tier derives them: defaults overlaid with KAFKA_* variables."""
    config = dict(PRODUCER_DEFAULTS)
    for name, value in env.items():
        if name.startswith(KAFKA_PREFIX):
            config[name[len(KAFKA_PREFIX):].lower().replace("_", ".")] = value
    return config


def _env_name(kafka_key: str) -> str:
    return KAFKA_PREFIX + kafka_key.upper().replace(".", "_")


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
        report.add("settings", "fail", hide(str(exc), secrets))

    kafka = dict(settings.producer_config) if settings else _kafka_env(env)
    _check_producer(report, kafka)
    _check_timeouts(report, env, settings, kafka)

    # DATABASE_URL as the tier reads it: from DATABASE_URL_FILE when given so (Settings reads the
    # file on its own: it is given env, which must not name both).
    db_env = with_file_values(env)
    conn, refused_options = check_database(report, db_env, secrets)
    pending_topics: list[str] = []
    if conn is None:
        report.add("pooler", "skip", "database unreachable")
        report.add("schema", "skip", "database unreachable")
    else:
        with conn:
            check_pooler(report, db_env, settings, conn, refused_options, secrets)
            if _check_schema(report, conn):
                pending_topics = [r[0] for r in conn.execute(OPS.pending_topics_sample,
                                                             {"limit": PENDING_TOPIC_SAMPLE}).fetchall()]
                _check_horizon(report, conn, settings.horizon_max_wait_ms if settings else 5000)
                _check_long_keys(report, conn)
    check_broker_and_topics(report, kafka, secrets, topics, pending_topics, auto_create)
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
        staleness = setting_int(env, "OUTBOX_REAPER_STALENESS_SECONDS")
        drain_ms = setting_int(env, "OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS")
        worker_timeout = setting_int(env, "OUTBOX_WORKER_TIMEOUT_SECONDS")
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
    present = {(kind, name) for kind, name in conn.execute(OPS.schema_objects, {"tables": sorted(tables)}).fetchall()}
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
        notes.append(f"{foreign} pending rows carry transaction ids from another cluster "
                     "(re-stamped by the workers before their claims)")
    if not notes:
        report.add("horizon", "ok", "no open transaction holds the claim back")
    else:
        report.add("horizon", "warn", "; ".join(notes))




def _check_long_keys(report: Report, conn: psycopg.Connection) -> None:
    """Pending rows whose key is over the 1024-byte limit (rows older than migration 0009's CHECK):
    the claim of their shard's worker fails on each, so they are named with the fix."""
    from kaireon_pub.enqueue import MAX_KEY_BYTES

    rows = conn.execute(OPS.pending_long_keys, {"sample": LONG_KEY_SAMPLE, "limit": 10}).fetchall()
    if not rows:
        report.add("keys", "ok", f"no pending row near a shard's head has a key over {MAX_KEY_BYTES} bytes")
        return
    named = ", ".join(f"id {i} (topic {t!r}, shard {s}, key {max(k or 0, r or 0)} bytes)" for i, t, s, k, r in rows)
    more = " and maybe more" if len(rows) == 10 else ""
    report.add("keys", "warn", f"pending events with a key over {MAX_KEY_BYTES} bytes stop the claim of their "
                               f"shard's worker (index row size): {named}{more}; mark them failed or copy and "
                               "delete them (README, \"In the table, and from SQL\")")
