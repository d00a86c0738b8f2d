"""`kaireon-pub attach --debezium-table` / `detach`: publish from an unchanged Debezium outbox table.

Attach puts one trigger on the table (AFTER INSERT, FOR EACH ROW) whose function writes each new row
into outbox_events in the writer's own transaction, mapped as Debezium's Outbox Event Router maps it
by default: topic `outbox.event.<aggregatetype>`, key `aggregateid`, an `id` header with the event
id, the payload as the table holds it (jsonb's text, varchar's text, bytea's bytes). A row inserted
and deleted in one transaction is captured too: the trigger fired at the insert. From there the
tier publishes the event as any other (horizon, per-key order, poison isolation, PgBouncer).

The table's columns, indexes and constraints are not touched; detach drops the trigger and its
function and leaves the table as it was. Both are idempotent and run in one transaction with
their row in kaireon_debezium_attachments (migration 0006). The trigger and function SQL are the
named blocks of db/debezium.sql; the column expressions are chosen here from the catalogue's types.

By default the record carries the router's headers only (`id` and the --field-as-header ones): the
trigger writes the header-control entry `kaireon-headers: own-only` (read, and not sent, by
worker/kafka/records.py); `tier_headers=True` keeps the tier's event-id, event-type, created-at.

One job past 300 lines: the router's mapping is one set of rules (columns, topic routing, headers,
tombstones) checked against the table's catalogue types; attach and detach share all of it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import orjson
import psycopg
from psycopg import sql

from kaireon_pub.db import migrate
from kaireon_pub.db.connect import connect
from kaireon_pub.db.queries import load
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.ops.migrate import report_not_ready
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka.records import HEADERS_CONTROL, OWN_HEADERS_ONLY

log = logging.getLogger("kaireon_pub.ops.debezium")

D = load("debezium.sql")
TRIGGER = "kaireon_pub_capture"
ROUTED_BY_VALUE = "${routedByValue}"
DEFAULT_TOPIC_TEMPLATE = "outbox.event." + ROUTED_BY_VALUE
TEXT_PAYLOADS = {"json", "text", "varchar", "bpchar"}
DEFAULT_LOCK_TIMEOUT_S = 10.0


class AttachError(Exception):
    """The table cannot be attached as asked; the message is one line for the operator."""


@dataclass(frozen=True)
class Mapping:
    """The router's options, by their Debezium names in the comments."""

    event_id: str = "id"  # table.field.event.id: the `id` header
    key: str = "aggregateid"  # table.field.event.key: the record's key
    payload: str = "payload"  # table.field.event.payload: the record's value
    event_type: str = "type"  # table.field.event.type: outbox_events.event_type ('' for none)
    route_by: str = "aggregatetype"  # route.by.field
    topic_template: str = DEFAULT_TOPIC_TEMPLATE  # route.topic.replacement
    # route.topic.regex, as a PostgreSQL regular expression matched against the whole value:
    # ${routedByValue} is then its first capture group (Debezium's default, `(?<routedByValue>.*)`,
    # is the whole value); a value it does not match is used whole.
    topic_regex: str | None = None
    tombstone_on_empty_payload: bool = False  # route.tombstone.on.empty.payload
    headers: tuple[tuple[str, str], ...] = ()  # table.fields.additional.placement COLUMN:header:NAME
    tier_headers: bool = False  # the tier's own event-id, event-type, created-at as well

    def as_json(self) -> dict[str, object]:
        found = asdict(self)
        found["headers"] = [list(pair) for pair in self.headers]
        return found


def parse_header_field(text: str) -> tuple[str, str]:
    """`COLUMN[:NAME]` (Debezium's `column:header:alias` without the placement): (column, header name)."""
    column, _, name = text.partition(":")
    if not column.strip():
        raise AttachError(f"--field-as-header {text!r}: a column name is needed (COLUMN or COLUMN:NAME)")
    return column.strip(), (name.strip() or column.strip())


def function_name(table: str) -> str:
    """The trigger function's name, in the table's schema; a long table name gives a hashed one (63 bytes)."""
    name = f"kaireon_capture_{table}"
    if len(name.encode()) <= 63:
        return name
    return "kaireon_capture_" + hashlib.sha256(table.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Column:
    name: str
    type_name: str  # format_type, for messages
    typname: str


def _columns(conn: psycopg.Connection, table: str) -> dict[str, Column]:
    rows = conn.execute(D.table_columns, {"table": table}).fetchall()
    return {name: Column(name, type_name, typname) for name, type_name, typname, _category in rows}


def _need(columns: dict[str, Column], name: str, option: str, table: str) -> Column:
    if name not in columns:
        raise AttachError(f"{table} has no column {name!r} ({option}); its columns: {', '.join(columns)}")
    return columns[name]


def _payload_expressions(column: Column, tombstone: bool) -> tuple[sql.Composable, sql.Composable]:
    """(payload jsonb, payload_bytes bytea) for the payload column's type."""
    new = sql.SQL("NEW.{}").format(sql.Identifier(column.name))
    null = sql.SQL("NULL")
    if column.typname == "jsonb":
        return new, null  # published as payload::text: jsonb's own text, as the table gives it out
    if column.typname == "bytea":
        value = sql.SQL("NULLIF({}, '\\x'::bytea)").format(new) if tombstone else new
        return null, value
    if column.typname in TEXT_PAYLOADS:
        value = sql.SQL("pg_catalog.convert_to({}::text, 'UTF8')").format(new)
        if tombstone:
            value = sql.SQL("NULLIF({}, '\\x'::bytea)").format(value)
        return null, value
    raise AttachError(f"payload column {column.name!r} is {column.type_name}: one of jsonb, json, text, "
                      "varchar, char or bytea is needed")


def _key_expressions(column: Column) -> tuple[sql.Composable, sql.Composable]:
    """(partition_key, partition_key_bytes): a bytea key is kept exactly, with its hex as its text
    (as enqueue() stores a key that is not text)."""
    new = sql.SQL("NEW.{}").format(sql.Identifier(column.name))
    if column.typname == "bytea":
        return sql.SQL("'\\x' || pg_catalog.encode({}, 'hex')").format(new), new
    return sql.SQL("{}::text").format(new), sql.SQL("NULL")


def _routed_value(column: Column, regex: str | None) -> sql.Composable:
    value = sql.SQL("NEW.{}::text").format(sql.Identifier(column.name))
    if not regex:
        return sql.SQL("coalesce({}, '')").format(value)
    anchored = sql.Literal(f"^(?:{regex})$")
    return sql.SQL("coalesce(pg_catalog.substring({0}, {1}), {0}, '')").format(value, anchored)


def _header_pairs(pairs: list[tuple[str, sql.Composable]]) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}, {}").format(sql.Literal(name), value) for name, value in pairs)


def capture_function(mapping: Mapping, columns: dict[str, Column], *, table: str, schema: str,
                     function: str, outbox_schema: str) -> sql.Composed:
    """The CREATE OR REPLACE FUNCTION of the attachment (db/debezium.sql's capture_function)."""
    if ROUTED_BY_VALUE not in mapping.topic_template and "$" in mapping.topic_template:
        raise AttachError(f"--topic-template {mapping.topic_template!r}: the only variable is {ROUTED_BY_VALUE}")
    event_id = _need(columns, mapping.event_id, "--field-event-id", table)
    key = _need(columns, mapping.key, "--field-key", table)
    payload = _need(columns, mapping.payload, "--field-payload", table)
    route_by = _need(columns, mapping.route_by, "--route-by-field", table)
    event_type = sql.SQL("NULL")
    if mapping.event_type:
        event_type = sql.SQL("NEW.{}").format(sql.Identifier(_need(columns, mapping.event_type,
                                                                   "--field-type", table).name))
    payload_jsonb, payload_bytes = _payload_expressions(payload, mapping.tombstone_on_empty_payload)
    key_text, key_bytes = _key_expressions(key)
    text_headers: list[tuple[str, sql.Composable]] = [
        ("id", sql.SQL("NEW.{}::text").format(sql.Identifier(event_id.name)))]
    binary_headers: list[tuple[str, sql.Composable]] = []
    for column_name, header in mapping.headers:
        column = _need(columns, column_name, "--field-as-header", table)
        new = sql.SQL("NEW.{}").format(sql.Identifier(column.name))
        if column.typname == "bytea":  # base64 without the line breaks encode() puts every 76 characters
            binary_headers.append((header, sql.SQL("pg_catalog.translate(pg_catalog.encode({}, 'base64'), "
                                                   "E'\\n', '')").format(new)))
        else:
            text_headers.append((header, sql.SQL("{}::text").format(new)))
    if not mapping.tier_headers:
        text_headers.append((HEADERS_CONTROL, sql.Literal(OWN_HEADERS_ONLY.decode())))
    return sql.SQL(D.capture_function).format(
        function=sql.Identifier(schema, function),
        outbox=sql.Identifier(outbox_schema, "outbox_events"),
        topic_template=sql.Literal(mapping.topic_template),
        routed_variable=sql.Literal(ROUTED_BY_VALUE),
        routed_value=_routed_value(route_by, mapping.topic_regex),
        key_text=key_text, key_bytes=key_bytes,
        payload_jsonb=payload_jsonb, payload_bytes=payload_bytes,
        headers=_header_pairs(text_headers), binary_headers=_header_pairs(binary_headers),
        event_type=event_type,
    )


@dataclass(frozen=True)
class Result:
    table: str  # schema.name
    changed: bool
    what: str  # one line for the operator


def _identity(conn: psycopg.Connection, table: str) -> tuple[str, str]:
    try:
        row = conn.execute(D.table_identity, {"table": table}).fetchone()
    except psycopg.errors.UndefinedTable:
        raise AttachError(f"table {table} does not exist") from None
    except (psycopg.errors.InvalidName, psycopg.errors.SyntaxError):
        raise AttachError(f"{table!r} is not a table name (SCHEMA.TABLE)") from None
    schema, name, kind = row
    if kind not in ("r", "p"):
        raise AttachError(f"{table} is not a table")
    return schema, name


def attach(conn: psycopg.Connection, table: str, mapping: Mapping,
           lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Result:
    """Attach `table` (idempotent: the same mapping again changes nothing; another one replaces it)."""
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{round(lock_timeout_s * 1000)}ms",))
        schema, name = _identity(conn, table)
        outbox_schema = conn.execute(D.outbox_schema).fetchone()
        if outbox_schema is None:
            raise AttachError(f"no outbox_events table: {migrate.MIGRATE_HINT}")
        qualified = f"{schema}.{name}"
        function = function_name(name)
        wanted = mapping.as_json()
        existing = conn.execute(D.attachment, {"schema": schema, "name": name}).fetchone()
        trigger_there = conn.execute(D.trigger_present, {"table": qualified_regclass(schema, name),
                                                         "trigger": TRIGGER}).fetchone()[0]
        if existing is not None and existing[1] == wanted and existing[0] == function and trigger_there:
            return Result(qualified, False, f"{qualified} is already attached with these options: nothing changed")
        names = {"function": sql.Identifier(schema, function), "trigger": sql.Identifier(TRIGGER),
                 "table": sql.Identifier(schema, name)}
        if mapping.topic_regex:
            _check_regex(conn, mapping.topic_regex)
        create = capture_function(mapping, _columns(conn, qualified_regclass(schema, name)), table=qualified,
                                  schema=schema, function=function, outbox_schema=outbox_schema[0])
        # Another mapping, or a trigger or function lost since: the trigger is made again, so it
        # calls this function (a table renamed since has a function of another name).
        conn.execute(sql.SQL(D.drop_trigger).format(**names))
        if existing is not None and existing[0] != function:
            conn.execute(sql.SQL(D.drop_function).format(**{**names, "function": sql.Identifier(schema, existing[0])}))
        conn.execute(create)
        conn.execute(sql.SQL(D.revoke_function).format(**names))
        conn.execute(sql.SQL(D.create_trigger).format(**names))
        conn.execute(D.record_attachment, {"schema": schema, "name": name, "function_name": function,
                                           "options": orjson.dumps(wanted).decode()})
    how = "re-attached with new options" if existing is not None else "attached"
    return Result(qualified, True, f"{qualified} {how}: each row inserted is published to "
                                   f"{mapping.topic_template.replace(ROUTED_BY_VALUE, '<' + mapping.route_by + '>')}")


def _check_regex(conn: psycopg.Connection, regex: str) -> None:
    try:
        with conn.transaction():
            conn.execute("SELECT '' ~ %s", (f"^(?:{regex})$",))
    except psycopg.errors.InvalidRegularExpression as exc:
        raise AttachError(f"--topic-regex {regex!r} is not a PostgreSQL regular expression: "
                          f"{str(exc).strip().splitlines()[0]}") from None


def detach(conn: psycopg.Connection, table: str, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Result:
    """Drop the trigger, its function and the bookkeeping row (idempotent)."""
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{round(lock_timeout_s * 1000)}ms",))
        schema, name = _identity(conn, table)
        qualified = f"{schema}.{name}"
        existing = conn.execute(D.attachment, {"schema": schema, "name": name}).fetchone()
        trigger_there = conn.execute(D.trigger_present, {"table": qualified_regclass(schema, name),
                                                         "trigger": TRIGGER}).fetchone()[0]
        if existing is None and not trigger_there:
            return Result(qualified, False, f"{qualified} is not attached: nothing changed")
        function = existing[0] if existing is not None else function_name(name)
        names = {"function": sql.Identifier(schema, function), "trigger": sql.Identifier(TRIGGER),
                 "table": sql.Identifier(schema, name)}
        conn.execute(sql.SQL(D.drop_trigger).format(**names))
        conn.execute(sql.SQL(D.drop_function).format(**names))
        conn.execute(D.forget_attachment, {"schema": schema, "name": name})
    return Result(qualified, True, f"{qualified} detached: its rows are no longer published by kaireon-pub")


def qualified_regclass(schema: str, name: str) -> str:
    """A regclass input that names exactly this table (quoted)."""
    return sql.Identifier(schema, name).as_string(None)


def run(settings: Settings, action: str, table: str, *, mapping: Mapping | None = None,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, echo: Callable[[str], None]) -> int:
    """The commands: one line on stdout, one log line; exit 0, 2 for a table or option that does not
    fit, 5 without the schema, 1 on a database error."""
    audit: dict[str, object] = {"event": f"debezium {action}", "table": table}
    try:
        with connect(settings, action) as conn:
            migrate.require_current(conn)
            if action == "attach":
                result = attach(conn, table, mapping or Mapping(), lock_timeout_s)
            else:
                result = detach(conn, table, lock_timeout_s)
    except migrate.SchemaNotReady as exc:
        return report_not_ready(exc, action)
    except AttachError as exc:
        log.error(f"{action} refused: {exc}", extra={**audit, "errorId": new_error_id()})
        echo(f"{action}: {exc}")
        return ExitCode.CONFIG
    except psycopg.Error as exc:
        error_id = new_error_id()
        text = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, settings)
        log.error(f"{action} failed", extra={**audit, "errorId": error_id, "errorType": type(exc).__name__,
                                             "error": text})
        echo(f"{action} failed: {type(exc).__name__}: {text} (errorId {error_id}); nothing was changed")
        return ExitCode.CRASH
    echo(result.what)
    log.info(result.what, extra={**audit, "table": result.table, "changed": result.changed,
                                 **({"options": mapping.as_json()} if mapping is not None else {})})
    return ExitCode.OK
