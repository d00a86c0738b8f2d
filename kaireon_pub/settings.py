"""Every setting of the tier, read from the environment once and validated in one place.

`Settings.from_env()` parses; `Settings.validate()` checks ranges and the relations between
fields. Any problem raises `ConfigError` naming the variable, what is wrong with its value and the
accepted range; the CLI turns that into one log line and exit code 2, before any connection or
process is made.

`SETTINGS` below is the single registry of environment variables: the README's configuration
table, the Helm chart and the compose file are checked against it by tests.

One job, in one file past 300 lines on purpose: the project's rule is one settings module with one
`validate()`, so the registry, the parsing and the cross-field rules are read together. Which
settings are secret, and how they are hidden, is `kaireon_pub.redact`'s.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kaireon_pub.errors import ConfigError

log = logging.getLogger("kaireon_pub.settings")

# librdkafka settings are passed through from variables with this prefix:
# KAFKA_SASL_USERNAME -> sasl.username, KAFKA_MESSAGE_TIMEOUT_MS -> message.timeout.ms.
KAFKA_PREFIX = "KAFKA_"

# Kubernetes writes variables like these into every pod of a namespace that has a Service whose
# name starts with "kafka" (service links: KAFKA_PORT=tcp://10.0.0.7:9092, KAFKA_SERVICE_HOST, …).
# No librdkafka property has such a name, so they are never taken for one.
SERVICE_LINK = re.compile(
    r"^KAFKA(_[A-Z0-9]+)*_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$"
)

# Producer settings the tier's guarantees rest on; an operator may not weaken them.
SAFE_PRODUCER_SETTINGS = {"enable.idempotence": {"true"}, "acks": {"all", "-1"}}

PRODUCER_DEFAULTS = {
    "enable.idempotence": "true",
    "acks": "all",
    # librdkafka's default is 300 s, far beyond the 15 s drain budget.
    "message.timeout.ms": "10000",
    "linger.ms": "5",
    "compression.type": "lz4",
    "queue.buffering.max.messages": "200000",
}


@dataclass(frozen=True)
class Setting:
    env: str
    default: str | None
    doc: str


# The registry: env name, default (as the environment would spell it), effect.
SETTINGS: tuple[Setting, ...] = (
    Setting("DATABASE_URL", None, "PostgreSQL connection string (libpq URI or key=value). Required."),
    Setting("KAFKA_BOOTSTRAP_SERVERS", None, "Broker list, host:port[,host:port]. Required."),
    Setting("OUTBOX_POLL_INTERVAL_MS", "2000", "Idle poll cadence; workers also wake on LISTEN/NOTIFY. 10..600000."),
    Setting("OUTBOX_BATCH_SIZE", "1000", "Events claimed per batch. 1..10000."),
    Setting("OUTBOX_WORKERS", "", "Publisher worker processes per supervisor; empty = CPU count. 1..64."),
    Setting("OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS", "15000", "SIGTERM drain budget. 1000..600000."),
    Setting("OUTBOX_LIVENESS_FILE", "/tmp/outbox-publisher.alive",
            "File the supervisor touches while every worker is healthy."),
    Setting("OUTBOX_WORKER_TIMEOUT_SECONDS", "30",
            "A worker whose heartbeat is older is killed and respawned. 2..3600."),
    Setting("OUTBOX_REAPER_STALENESS_SECONDS", "300",
            "Rows in processing longer than this are reset by the reaper. Invalid or non-positive: default, with a "
            "warning."),
    Setting("OUTBOX_MAX_ATTEMPTS", "10", "Delivery attempts before an event becomes failed. 1..1000."),
    Setting("OUTBOX_BACKOFF_BASE_MS", "1000", "First retry delay; doubles per attempt. 1..3600000."),
    Setting("OUTBOX_BACKOFF_MAX_MS", "300000", "Retry delay cap. >= OUTBOX_BACKOFF_BASE_MS."),
    Setting("OUTBOX_MAX_PAYLOAD_BYTES", "1000000", "enqueue() refuses larger payloads. 1..104857600."),
    Setting("OUTBOX_CLOUDEVENTS", "false",
            "Add the CloudEvents attributes to every record (binary content mode of the Kafka binding: "
            "ce_specversion, ce_id, ce_source, ce_type, ce_time, content-type)."),
    Setting("OUTBOX_CLOUDEVENTS_SOURCE", "",
            "The CloudEvents source of every record (a URI-reference, e.g. /orders-service); required when "
            "OUTBOX_CLOUDEVENTS is true."),
    Setting("OUTBOX_MAX_CONSECUTIVE_FAILURES", "30", "Non-transient tick failures in a row before exit 3. 1..10000."),
    Setting("OUTBOX_ORDERING", "strict",
            "strict: a key waits while its earlier event is retrying; relaxed: later events flow, violations counted."),
    Setting("OUTBOX_CLAIM_MODE", "status",
            "status: pending->processing->published; lock: row lock of a short transaction is the claim (one write "
            "per event)."),
    Setting("OUTBOX_DELETE_ON_PUBLISH", "false", "Delete rows once delivered instead of marking them published."),
    Setting("OUTBOX_LEASE_TTL_SECONDS", "10", "Shard lease lifetime; renewed every TTL/3. 2..600."),
    Setting("OUTBOX_HORIZON_MAX_WAIT_MS", "5000",
            "How long the claim waits for a transaction of the outbox's database that is still open (it might yet "
            "insert an outbox row); past that, publishing goes on and the transaction's rows are found when it ends. "
            "100..3600000."),
    Setting("OUTBOX_RESCAN_INTERVAL_MS", "30000",
            "Periodic full rescan of owned shards (rows released behind the cursor). 1000..3600000."),
    Setting("OUTBOX_RETENTION_SECONDS", "604800", "Published rows older than this are purged; 0 disables the purge."),
    Setting("OUTBOX_FAILED_RETENTION_SECONDS", "2592000",
            "Partitioned outbox: a partition holding failed rows is dropped only once the newest of them failed "
            "longer ago than this; 0 keeps such partitions. 0..315360000."),
    Setting("OUTBOX_PARTITIONING", "none",
            "none: the plain outbox table. hourly | daily: `migrate` makes outbox_events range-partitioned on "
            "created_at on a fresh database, and retention drops whole partitions (see docs/operations.md). none | "
            "hourly | daily."),
    Setting("OUTBOX_DEAD_LETTER_TOPIC", "",
            "Opt-in dead-letter topic: an event that turns failed is also published there, with headers naming its "
            "topic, key, event id, attempts and error; the row records it (dead_lettered_at). Empty: off. A legal "
            "Kafka topic name."),
    Setting("OUTBOX_AUDIT_SAMPLE_PER_MINUTE", "0",
            "Continuous auditor: published events per minute each worker reads back from the broker at their "
            "recorded offsets and compares with their rows (kaireon_outbox_audit_* metrics). 0: off. 0..6000."),
    Setting("OUTBOX_PURGE_BATCH_SIZE", "5000", "Rows deleted per purge statement. 1..100000."),
    Setting("OUTBOX_PURGE_INTERVAL_SECONDS", "60", "Pause between purge passes. 1..86400."),
    Setting("OUTBOX_STATEMENT_TIMEOUT_MS", "30000", "statement_timeout of the tier's database sessions. 100..600000."),
    Setting("OUTBOX_SYNCHRONOUS_COMMIT", "off",
            "synchronous_commit of the workers' sessions (claims, marks, leases). off: a database crash may undo the "
            "last moments of marks, and those events are published again; on: every batch waits for two WAL flushes. "
            "off | local | remote_write | on | remote_apply."),
    Setting("OUTBOX_POOL_MODE", "session",
            "session: DATABASE_URL reaches PostgreSQL or a session pooler (session settings, LISTEN, prepared "
            "statements); transaction: DATABASE_URL is a transaction pooler such as PgBouncer pool_mode=transaction "
            "(no prepared statements, session settings re-applied in every transaction, LISTEN only on "
            "OUTBOX_LISTEN_DATABASE_URL). session | transaction."),
    Setting("OUTBOX_LISTEN_DATABASE_URL", "",
            "Connection string of a session to the server itself, for LISTEN (and `migrate`) when DATABASE_URL is a "
            "transaction pooler; empty: LISTEN on DATABASE_URL in session mode, polling every OUTBOX_POLL_INTERVAL_MS "
            "in transaction mode."),
    Setting("OUTBOX_HTTP_HOST", "0.0.0.0", "Address of /metrics, /healthz, /readyz and the cron route."),
    Setting("OUTBOX_HTTP_PORT", "9464",
            "Port of the HTTP server; 0 picks a free port (logged as `http listening`). 0..65535."),
    Setting("OUTBOX_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR."),
    Setting("CRON_SECRET", None,
            "Shared secret of /api/v1/cron/outbox-reaper, at least 16 bytes (shorter: exit 2). Unset/blank: the route "
            "answers 401."),
    Setting("CRON_SECRET_PREVIOUS", None,
            "During a rotation, the secret being replaced: accepted beside CRON_SECRET until removed or until "
            "CRON_SECRET_PREVIOUS_EXPIRES_AT. At least 16 bytes; requires CRON_SECRET."),
    Setting("CRON_SECRET_PREVIOUS_EXPIRES_AT", "",
            "When CRON_SECRET_PREVIOUS stops being accepted: an ISO-8601 time with its offset (2026-05-01T12:00:00Z); "
            "empty: until it is removed."),
    Setting("DATABASE_URL_FILE", "",
            "A file holding DATABASE_URL (a mounted Secret), read at start; set one of DATABASE_URL and "
            "DATABASE_URL_FILE."),
    Setting("CRON_SECRET_FILE", "",
            "A file holding CRON_SECRET, read at start and again whenever the file changes (a rotated Kubernetes "
            "Secret takes effect without a restart); set one of CRON_SECRET and CRON_SECRET_FILE."),
    Setting("CRON_SECRET_PREVIOUS_FILE", "",
            "A file holding CRON_SECRET_PREVIOUS, re-read like CRON_SECRET_FILE; set one of the two."),
    Setting("KAFKA_SASL_PASSWORD_FILE", "",
            "A file holding librdkafka's sasl.password, read at start; set one of KAFKA_SASL_PASSWORD and "
            "KAFKA_SASL_PASSWORD_FILE. Any other secret librdkafka property may be given the same way "
            "(KAFKA_SSL_KEY_PASSWORD_FILE, …)."),
    Setting("PROMETHEUS_MULTIPROC_DIR", "",
            "Directory for multiprocess metrics; empty = a fresh temporary directory. At start only "
            "prometheus-client's own *.db files in it are removed."),
)

SYNCHRONOUS_COMMIT_LEVELS = ("off", "local", "remote_write", "on", "remote_apply")
POOL_MODES = ("session", "transaction")
PARTITIONINGS = ("none", "hourly", "daily")
SETTING_NAMES = frozenset(s.env for s in SETTINGS)
DEFAULTS = {s.env: s.default for s in SETTINGS}
# A variable NAME may instead be given as NAME_FILE: the path of a file holding its value.
FILE_SUFFIX = "_FILE"
# The variables that may be given as a file (KAFKA_* ones too: any secret librdkafka property).
FILE_SETTINGS = ("DATABASE_URL", "CRON_SECRET", "CRON_SECRET_PREVIOUS")
# A cron secret shorter than this is a configuration error (a guessable shared secret).
MIN_CRON_SECRET_BYTES = 16
# Values a template renders for a missing secret; given as a cron secret they mean "unset".
PLACEHOLDER_SECRETS = frozenset({"none", "null", "undefined", "nil"})


def kafka_property(env_name: str) -> str:
    """The librdkafka property a KAFKA_* variable sets (KAFKA_SASL_USERNAME -> sasl.username)."""
    return env_name[len(KAFKA_PREFIX):].lower().replace("_", ".")


# The librdkafka properties whose value is a secret; documented in kaireon_pub.redact, which uses it.
_SECRET_PROPERTY = re.compile(r"password|passphrase|secret|(?:^|\.)key\.pem$|(?:^|\.)(?:oauthbearer|jaas)\.config$")


def is_secret_property(prop: str) -> bool:
    """True for a librdkafka property whose value is a secret (sasl.password, ssl.key.pem, …)."""
    return bool(_SECRET_PROPERTY.search(prop.strip().lower()))


def is_service_link(env_name: str) -> bool:
    """True for a Kubernetes service-link variable (never a librdkafka property)."""
    return bool(SERVICE_LINK.match(env_name))


def check_database_url(url: str, name: str = "DATABASE_URL") -> None:
    """A connection string libpq can parse, with numeric ports; the error never repeats it."""
    import psycopg

    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        # libpq quotes the whole string, password included: keep only its reason.
        reason = str(exc).strip().splitlines()[0]
        reason = re.split(r' in (?:URI|connection info string)[: ]', reason)[0].split(': "')[0]
        reason = re.sub(r'"[^"]{2,}"', '"…"', reason)  # a quoted fragment may be part of a password
        raise ConfigError(name, f"is not a valid connection string ({reason})",
                          "a libpq URI (postgresql://user@host:5432/db) or key=value string") from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(name, f"port {port!r} is not a port number", "1..65535")


def read_secret_file(variable: str, path: str) -> str:
    """The value held by the file `variable` names, without its trailing newline; a ConfigError
    naming `variable` (never the content) when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(variable, f"cannot be read ({reason})", "the path of a readable UTF-8 file") from None


def value_or_file(env: Mapping[str, str], name: str) -> tuple[str | None, str]:
    """NAME's value from NAME or from the file NAME_FILE names: (value, file path or "").
    Both set is a ConfigError naming both."""
    file_name = name + FILE_SUFFIX
    path = (env.get(file_name) or "").strip()
    if not path:
        return env.get(name), ""
    if env.get(name) is not None:
        raise ConfigError(file_name, f"and {name} are both set", f"one of {name} or {file_name}")
    return read_secret_file(file_name, path), path


def kafka_file_property(env: Mapping[str, str], name: str, path: str) -> str:
    """The secret librdkafka property a KAFKA_*_FILE variable gives from a file
    (KAFKA_SASL_PASSWORD_FILE -> sasl.password); ConfigError for a property that is not a secret
    (give it inline) or one given both ways."""
    inline = name[: -len(FILE_SUFFIX)]
    prop = kafka_property(inline)
    if not is_secret_property(prop):
        raise ConfigError(name, f"names a file for {prop}, which is not a secret property",
                          f"{inline} set to the value; files for secret properties only (sasl.password, ...)")
    if env.get(inline) is not None:
        raise ConfigError(name, f"and {inline} are both set", f"one of {inline} or {name}")
    if not path.strip():
        raise ConfigError(name, "is empty", "the path of a readable UTF-8 file")
    return prop


def cron_secret_problem(value: str | None) -> str | None:
    """Why a configured cron secret is refused (too short), or None; unset, blank and template
    placeholders mean "no secret" (the route answers 401), not an error."""
    text = (value or "").strip()
    if not text or text.lower() in PLACEHOLDER_SECRETS:
        return None
    if len(text.encode("utf-8")) < MIN_CRON_SECRET_BYTES:
        return f"is shorter than {MIN_CRON_SECRET_BYTES} bytes"
    return None


def is_set_secret(value: str | None) -> bool:
    text = (value or "").strip()
    return bool(text) and text.lower() not in PLACEHOLDER_SECRETS


def parse_expiry(name: str, text: str) -> float | None:
    """An ISO-8601 time with its offset as a Unix time; empty is None."""
    from datetime import datetime

    text = text.strip()
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ConfigError(name, f"{text!r} is not an ISO-8601 time with an offset",
                          "e.g. 2026-05-01T12:00:00Z or 2026-05-01T14:00:00+02:00")
    return when.timestamp()


# A legal Kafka topic name (as the broker checks it: 1..249 of these characters, not "." or "..").
LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def dead_letter_topic(value: str) -> str:
    """OUTBOX_DEAD_LETTER_TOPIC: empty (off) or a topic name the broker would accept."""
    topic = value.strip()
    if topic and (not LEGAL_TOPIC.fullmatch(topic) or topic in (".", "..")):
        raise ConfigError("OUTBOX_DEAD_LETTER_TOPIC", f"{topic!r} is not a legal Kafka topic name",
                          "1..249 characters of a-z A-Z 0-9 . _ -, not '.' or '..'")
    return topic


def kafka_env_name(prop: str) -> str:
    """The environment variable that sets librdkafka property `prop` (sasl.username -> KAFKA_SASL_USERNAME)."""
    return KAFKA_PREFIX + prop.upper().replace(".", "_")


@dataclass(frozen=True)
class Settings:
    database_url: str = field(repr=False)  # holds the password
    kafka_bootstrap_servers: str
    poll_interval_ms: int = 2000
    batch_size: int = 1000
    workers: int = 1
    shutdown_drain_timeout_ms: int = 15000
    liveness_file: str = "/tmp/outbox-publisher.alive"
    worker_timeout_seconds: int = 30
    reaper_staleness_seconds: int = 300
    max_attempts: int = 10
    backoff_base_ms: int = 1000
    backoff_max_ms: int = 300000
    max_payload_bytes: int = 1_000_000
    cloudevents: bool = False
    cloudevents_source: str = ""
    max_consecutive_failures: int = 30
    ordering: str = "strict"
    claim_mode: str = "status"
    delete_on_publish: bool = False
    lease_ttl_seconds: int = 10
    rescan_interval_ms: int = 30000
    horizon_max_wait_ms: int = 5000
    retention_seconds: int = 604800
    failed_retention_seconds: int = 2592000
    partitioning: str = "none"
    dead_letter_topic: str = ""
    audit_sample_per_minute: int = 0
    purge_batch_size: int = 5000
    purge_interval_seconds: int = 60
    statement_timeout_ms: int = 30000
    synchronous_commit: str = "off"
    pool_mode: str = "session"
    listen_database_url: str = field(default="", repr=False)
    http_host: str = "0.0.0.0"
    http_port: int = 9464
    log_level: str = "INFO"
    cron_secret: str | None = field(default=None, repr=False)
    # The rotation window: the secret being replaced, and when it stops being accepted (Unix time).
    cron_secret_previous: str | None = field(default=None, repr=False)
    cron_secret_previous_expires_at: float | None = None
    # The files the cron secrets were read from ("" when given inline): re-read when they change.
    cron_secret_file: str = ""
    cron_secret_previous_file: str = ""
    prometheus_multiproc_dir: str = ""
    # librdkafka producer configuration: defaults overlaid with KAFKA_* pass-through.
    producer_config: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Warnings found while parsing (e.g. a staleness fallback), logged by the caller.
    warnings: tuple[str, ...] = ()

    # ---- parsing -------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, need_kafka: bool = True) -> Settings:
        """Parse and validate. `need_kafka=False` for commands that never touch the broker."""
        env = os.environ if environ is None else environ
        warnings: list[str] = []

        def raw(name: str) -> str | None:
            value = env.get(name)
            return value if value is not None else DEFAULTS[name]

        def integer(name: str, lo: int, hi: int) -> int:
            text = raw(name)
            try:
                value = int(str(text).strip())
            except (TypeError, ValueError):
                raise ConfigError(name, f"{text!r} is not an integer", f"{lo}..{hi}") from None
            if not lo <= value <= hi:
                raise ConfigError(name, f"{value} is out of range", f"{lo}..{hi}")
            return value

        def choice(name: str, options: tuple[str, ...]) -> str:
            value = str(raw(name)).strip().lower()
            if value not in options:
                raise ConfigError(name, f"{raw(name)!r} is not one of the accepted values", " | ".join(options))
            return value

        def boolean(name: str) -> bool:
            value = str(raw(name)).strip().lower()
            if value in ("1", "true", "yes", "on"):
                return True
            if value in ("0", "false", "no", "off"):
                return False
            raise ConfigError(name, f"{raw(name)!r} is not a boolean", "true | false")

        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError(name, "is not set", "a non-empty value")
            return value

        # NAME or NAME_FILE (a mounted Secret): from here on the value is the same wherever it came from.
        files: dict[str, str] = {}
        file_values: dict[str, str] = {}
        for name in FILE_SETTINGS:
            value, path = value_or_file(env, name)
            files[name] = path
            if path:
                file_values[name] = value or ""
        if file_values:
            env = {**env, **file_values}

        database_url = required("DATABASE_URL")
        check_database_url(database_url)
        listen_database_url = env.get("OUTBOX_LISTEN_DATABASE_URL", "").strip()
        if listen_database_url:
            check_database_url(listen_database_url, "OUTBOX_LISTEN_DATABASE_URL")
        bootstrap = required("KAFKA_BOOTSTRAP_SERVERS") if need_kafka else env.get("KAFKA_BOOTSTRAP_SERVERS", "")

        workers_text = str(raw("OUTBOX_WORKERS")).strip()
        workers = (os.cpu_count() or 1) if workers_text == "" else integer("OUTBOX_WORKERS", 1, 64)

        # The spec: an invalid or non-positive staleness falls back to the default with a warning.
        staleness_text = env.get("OUTBOX_REAPER_STALENESS_SECONDS")
        staleness = 300
        if staleness_text is not None:
            try:
                staleness = int(staleness_text.strip())
                if staleness <= 0:
                    raise ValueError
            except ValueError:
                staleness = 300
                warnings.append(
                    f"OUTBOX_REAPER_STALENESS_SECONDS={staleness_text!r} is not a positive integer; "
                    "using the default 300"
                )

        log_level = str(raw("OUTBOX_LOG_LEVEL")).strip().upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("OUTBOX_LOG_LEVEL", f"{raw('OUTBOX_LOG_LEVEL')!r} is not a log level",
                              "DEBUG | INFO | WARNING | ERROR")

        producer = dict(PRODUCER_DEFAULTS)
        for name, value in env.items():
            if name.startswith(KAFKA_PREFIX) and not is_service_link(name) and not name.endswith(FILE_SUFFIX):
                producer[kafka_property(name)] = value
        for name, path in env.items():
            if name.startswith(KAFKA_PREFIX) and name.endswith(FILE_SUFFIX) and not is_service_link(name):
                producer[kafka_file_property(env, name, path)] = read_secret_file(name, path.strip())
        producer["bootstrap.servers"] = bootstrap

        liveness_file = str(raw("OUTBOX_LIVENESS_FILE")).strip()
        if not liveness_file:
            raise ConfigError("OUTBOX_LIVENESS_FILE", "is empty", "a file path")

        cron_secret = env.get("CRON_SECRET")
        cron_secret_previous = env.get("CRON_SECRET_PREVIOUS")
        for name, value in (("CRON_SECRET", cron_secret), ("CRON_SECRET_PREVIOUS", cron_secret_previous)):
            problem = cron_secret_problem(value)
            if problem is not None:
                variable = name + FILE_SUFFIX if files[name] else name
                raise ConfigError(variable, problem, f"a random secret of at least {MIN_CRON_SECRET_BYTES} bytes, "
                                  "e.g. openssl rand -hex 32")
        if is_set_secret(cron_secret_previous) and not is_set_secret(cron_secret):
            raise ConfigError("CRON_SECRET_PREVIOUS", "is set while CRON_SECRET is not",
                              "CRON_SECRET set to the new secret, CRON_SECRET_PREVIOUS to the one it replaces")

        settings = cls(
            database_url=database_url,
            kafka_bootstrap_servers=bootstrap,
            poll_interval_ms=integer("OUTBOX_POLL_INTERVAL_MS", 10, 600_000),
            batch_size=integer("OUTBOX_BATCH_SIZE", 1, 10_000),
            workers=workers,
            shutdown_drain_timeout_ms=integer("OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS", 1000, 600_000),
            liveness_file=liveness_file,
            worker_timeout_seconds=integer("OUTBOX_WORKER_TIMEOUT_SECONDS", 2, 3600),
            reaper_staleness_seconds=staleness,
            max_attempts=integer("OUTBOX_MAX_ATTEMPTS", 1, 1000),
            backoff_base_ms=integer("OUTBOX_BACKOFF_BASE_MS", 1, 3_600_000),
            backoff_max_ms=integer("OUTBOX_BACKOFF_MAX_MS", 1, 86_400_000),
            max_payload_bytes=integer("OUTBOX_MAX_PAYLOAD_BYTES", 1, 104_857_600),
            cloudevents=boolean("OUTBOX_CLOUDEVENTS"),
            cloudevents_source=str(raw("OUTBOX_CLOUDEVENTS_SOURCE")).strip(),
            max_consecutive_failures=integer("OUTBOX_MAX_CONSECUTIVE_FAILURES", 1, 10_000),
            ordering=choice("OUTBOX_ORDERING", ("strict", "relaxed")),
            claim_mode=choice("OUTBOX_CLAIM_MODE", ("status", "lock")),
            delete_on_publish=boolean("OUTBOX_DELETE_ON_PUBLISH"),
            lease_ttl_seconds=integer("OUTBOX_LEASE_TTL_SECONDS", 2, 600),
            rescan_interval_ms=integer("OUTBOX_RESCAN_INTERVAL_MS", 1000, 3_600_000),
            horizon_max_wait_ms=integer("OUTBOX_HORIZON_MAX_WAIT_MS", 100, 3_600_000),
            retention_seconds=integer("OUTBOX_RETENTION_SECONDS", 0, 10 * 365 * 86400),
            failed_retention_seconds=integer("OUTBOX_FAILED_RETENTION_SECONDS", 0, 10 * 365 * 86400),
            partitioning=choice("OUTBOX_PARTITIONING", PARTITIONINGS),
            dead_letter_topic=dead_letter_topic(env.get("OUTBOX_DEAD_LETTER_TOPIC", "")),
            audit_sample_per_minute=integer("OUTBOX_AUDIT_SAMPLE_PER_MINUTE", 0, 6000),
            purge_batch_size=integer("OUTBOX_PURGE_BATCH_SIZE", 1, 100_000),
            purge_interval_seconds=integer("OUTBOX_PURGE_INTERVAL_SECONDS", 1, 86400),
            statement_timeout_ms=integer("OUTBOX_STATEMENT_TIMEOUT_MS", 100, 600_000),
            synchronous_commit=choice("OUTBOX_SYNCHRONOUS_COMMIT", SYNCHRONOUS_COMMIT_LEVELS),
            pool_mode=choice("OUTBOX_POOL_MODE", POOL_MODES),
            listen_database_url=listen_database_url,
            http_host=str(raw("OUTBOX_HTTP_HOST")).strip(),
            http_port=integer("OUTBOX_HTTP_PORT", 0, 65535),
            log_level=log_level,
            cron_secret=cron_secret,
            cron_secret_previous=cron_secret_previous,
            cron_secret_previous_expires_at=parse_expiry(
                "CRON_SECRET_PREVIOUS_EXPIRES_AT", str(raw("CRON_SECRET_PREVIOUS_EXPIRES_AT"))),
            cron_secret_file=files["CRON_SECRET"],
            cron_secret_previous_file=files["CRON_SECRET_PREVIOUS"],
            prometheus_multiproc_dir=str(raw("PROMETHEUS_MULTIPROC_DIR")).strip(),
            producer_config=producer,
            warnings=tuple(warnings),
        )
        settings.validate()
        return settings

    # ---- validation ------------------------------------------------------------------------

    @property
    def message_timeout_ms(self) -> int:
        return int(self.producer_config.get("message.timeout.ms", PRODUCER_DEFAULTS["message.timeout.ms"]))

    def validate(self) -> None:
        """Relations between fields; ranges of single fields are checked while parsing."""
        for key, accepted in SAFE_PRODUCER_SETTINGS.items():
            value = str(self.producer_config.get(key, "")).strip().lower()
            if value not in accepted:
                raise ConfigError(kafka_env_name(key), f"{value!r} would weaken at-least-once, in-order delivery",
                                  " | ".join(sorted(accepted)))
        try:
            timeout = self.message_timeout_ms
        except ValueError:
            timeout = self.producer_config.get("message.timeout.ms")
            raise ConfigError("KAFKA_MESSAGE_TIMEOUT_MS", f"{timeout!r} is not an integer", "1000..300000") from None
        if not 1000 <= timeout <= 300_000:
            raise ConfigError("KAFKA_MESSAGE_TIMEOUT_MS", f"{timeout} is out of range", "1000..300000")
        if self.cloudevents and not self.cloudevents_source:
            raise ConfigError("OUTBOX_CLOUDEVENTS_SOURCE", "is not set while OUTBOX_CLOUDEVENTS is true",
                              "a URI-reference, e.g. /orders-service")
        if self.cloudevents_source and (any(c.isspace() or not c.isprintable() for c in self.cloudevents_source)
                                        or not self.cloudevents_source.isascii()):
            raise ConfigError("OUTBOX_CLOUDEVENTS_SOURCE", f"{self.cloudevents_source!r} is not a URI-reference",
                              "printable ASCII without spaces, e.g. /orders-service or urn:example:orders")
        if self.pool_mode == "transaction" and self.listen_database_url == self.database_url:
            # LISTEN through a transaction pooler registers on whichever server connection ran it.
            raise ConfigError("OUTBOX_LISTEN_DATABASE_URL", "is DATABASE_URL, the transaction pooler: a LISTEN "
                              "through it is lost when the pooler hands the server connection on",
                              "a connection string of the server itself, or empty (polling)")
        if self.backoff_max_ms < self.backoff_base_ms:
            raise ConfigError(
                "OUTBOX_BACKOFF_MAX_MS",
                f"{self.backoff_max_ms} is below OUTBOX_BACKOFF_BASE_MS={self.backoff_base_ms}",
                f">= {self.backoff_base_ms}",
            )
        # The reaper must never reset a row librdkafka may still deliver: a claimed batch is
        # settled within message.timeout.ms, or within the drain budget at shutdown.
        floor_s = (timeout + self.shutdown_drain_timeout_ms) / 1000
        if self.reaper_staleness_seconds <= floor_s:
            raise ConfigError(
                "OUTBOX_REAPER_STALENESS_SECONDS",
                f"{self.reaper_staleness_seconds} is not above message.timeout.ms + drain budget ({floor_s:g} s)",
                f"> {floor_s:g}",
            )
        # A heartbeat must be able to go stale before Kubernetes gives up on the pod, and a
        # worker must outlive one slow tick (one message timeout) before it is called hung.
        if self.worker_timeout_seconds * 1000 <= timeout:
            raise ConfigError(
                "OUTBOX_WORKER_TIMEOUT_SECONDS",
                f"{self.worker_timeout_seconds} is not above message.timeout.ms ({timeout / 1000:g} s)",
                f"> {timeout / 1000:g}",
            )

    # ---- helpers ---------------------------------------------------------------------------

    def log_warnings(self) -> None:
        for message in self.warnings:
            log.warning(message, extra={"event": "config fallback"})
