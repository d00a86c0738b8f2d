"""The `kaireon-pub` command line: parses, hands off, holds no logic of its own.

One job, in one file past 300 lines on purpose: the command line's declarations (each command's
options, help and exit codes, read together as `kaireon-pub --help` shows them); what a command
does is in the module it hands off to.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from kaireon_pub import logs
from kaireon_pub.db.migrate import DEFAULT_LOCK_TIMEOUT_SECONDS
from kaireon_pub.errors import ConfigError, ExitCode, new_error_id
from kaireon_pub.redact import secret_values, secrets_of
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.cli")


def load_settings(*, need_kafka: bool = True) -> Settings:
    """Settings from the environment, or one line naming the problem and exit code 2."""
    logs.configure("INFO", secrets_of(os.environ))
    try:
        settings = Settings.from_env(need_kafka=need_kafka)
    except ConfigError as exc:
        log.error(
            f"invalid configuration: {exc}",
            extra={"errorId": new_error_id(), "variable": exc.variable, "problem": exc.problem,
                   "accepted": exc.accepted, "event": "config invalid"},
        )
        sys.exit(ExitCode.CONFIG)
    logs.configure(settings.log_level, secret_values(settings))
    settings.log_warnings()
    return settings


@click.group()
@click.version_option(package_name="kaireon-pub")
def cli() -> None:
    """kaireon-pub: publishes PostgreSQL outbox_events to Kafka, at least once, in order per key."""


@cli.command()
def run() -> None:
    """Run the publisher tier: a supervisor forking OUTBOX_WORKERS workers."""
    settings = load_settings()
    from kaireon_pub.supervisor.arbiter import Arbiter

    sys.exit(Arbiter(settings).run())


@cli.command()
@click.option("--check", "check_only", is_flag=True,
              help="Apply nothing: exit 0 when the schema is up to date, 5 when migrations are pending.")
@click.option("--lock-timeout", "lock_timeout", default=DEFAULT_LOCK_TIMEOUT_SECONDS, show_default=True,
              envvar="OUTBOX_MIGRATE_LOCK_TIMEOUT_SECONDS", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for another migrate's lock (several pods starting at once).")
def migrate(check_only: bool, lock_timeout: float) -> None:
    """Create or upgrade the schema (idempotent; safe to run from several pods at once).

    Each file is its own transaction; no statement timeout applies. Prints one line per file applied.
    """
    settings = load_settings(need_kafka=False)
    from kaireon_pub.ops import migrate as ops_migrate

    sys.exit(ops_migrate.run(settings, check_only=check_only, lock_timeout_seconds=lock_timeout, echo=click.echo))


@cli.command()
def reap() -> None:
    """Run the stuck-row reaper once and print its JSON result (for a plain CronJob)."""
    settings = load_settings(need_kafka=False)
    from kaireon_pub.reaper import run_cli_reap

    sys.exit(run_cli_reap(settings))


@cli.command("liveness-check")
@click.option("--file", "path", envvar="OUTBOX_LIVENESS_FILE", default="/tmp/outbox-publisher.alive", show_default=True)
@click.option("--max-stale-seconds", default=90.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
def liveness_check(path: str, max_stale_seconds: float) -> None:
    """Exit 0 when the liveness file exists and is fresh, 1 otherwise (the exec probe)."""
    from kaireon_pub.supervisor.liveness import file_age

    age = file_age(path)
    if age is None:
        click.echo(f"liveness file {path} is missing", err=True)
        sys.exit(1)
    if age > max_stale_seconds:
        click.echo(f"liveness file {path} is {age:.1f} s old (max {max_stale_seconds:g} s)", err=True)
        sys.exit(1)
    click.echo(f"ok: liveness file {path} is {age:.1f} s old")


# ---- operator tools (kaireon_pub.ops) ------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
def status(as_json: bool) -> None:
    """Backlog, oldest pending, lagging shards, failed events, shard owners, reaper runs."""
    settings = load_settings(need_kafka=False)
    from kaireon_pub.ops import status as ops_status

    sys.exit(ops_status.run(settings, as_json=as_json, echo=click.echo))


@cli.command()
@click.argument("action", type=click.Choice(["list", "create", "drop", "maintain"]), default="list")
@click.option("--dry-run", is_flag=True, help="Say what would be created or dropped; change nothing.")
@click.option("--ahead", type=click.IntRange(min=0, max=1000), default=None,
              help="Partitions to make after the current one (default: 6 hourly, 2 daily).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
def partitions(action: str, dry_run: bool, ahead: int | None, as_json: bool) -> None:
    """A partitioned outbox: list partitions, create them ahead, drop the ones that may go."""
    settings = load_settings(need_kafka=False)
    from kaireon_pub.ops import partitions as ops_partitions

    sys.exit(ops_partitions.run(settings, action, dry_run=dry_run, ahead=ahead, as_json=as_json, echo=click.echo))


@cli.command()
@click.option("--id", "ids", multiple=True, type=click.IntRange(min=1), help="A failed event id (repeatable).")
@click.option("--topic", default=None, help="Failed events of this topic.")
@click.option("--error-contains", default=None, help="Failed events whose last error contains TEXT (any case).")
@click.option("--all", "everything", is_flag=True, help="Every failed event (asks for confirmation).")
@click.option("--dry-run", is_flag=True, help="Count and list what would move; move nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (--all).")
def requeue(ids: tuple[int, ...], topic: str | None, error_contains: str | None, everything: bool,
            dry_run: bool, yes: bool) -> None:
    """Move failed events back to pending (attempts reset); the workers then publish them."""
    from kaireon_pub.ops import requeue as ops_requeue

    selection = ops_requeue.Selection(ids=ids, topic=topic, error_contains=error_contains, everything=everything)
    problem = selection.validate()
    if problem:
        raise click.UsageError(problem)
    settings = load_settings(need_kafka=False)

    def confirm(question: str) -> bool:
        try:
            return click.confirm(question, default=False, err=True)
        except click.Abort:  # no answer (stdin closed)
            return False
        finally:
            if not sys.stdin.isatty():
                click.echo("", err=True)  # a piped answer is not echoed: end the prompt's line

    sys.exit(ops_requeue.run(settings, selection, dry_run=dry_run, yes=yes, confirm=confirm, echo=click.echo))


def _when_option(_ctx: click.Context, param: click.Parameter, value: str | None) -> object:
    from kaireon_pub.ops.audit import parse_when

    try:
        return None if value is None else parse_when(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither an ISO 8601 time (2026-12-06T12:00:00Z) nor a duration "
                                 "ago (90s, 30m, 6h, 7d)", param=param) from None


@cli.command()
@click.option("--key", "keys", multiple=True, help="Events of this key (repeatable).")
@click.option("--id-from", type=click.IntRange(min=1), default=None, help="Events with id >= N.")
@click.option("--id-to", type=click.IntRange(min=1), default=None, help="Events with id <= N.")
@click.option("--since", callback=_when_option, default=None, metavar="TIME",
              help="Events published at or after TIME (published_at; ISO 8601, UTC when no zone; or 30m, 6h, 7d ago).")
@click.option("--until", callback=_when_option, default=None, metavar="TIME",
              help="Events published before TIME (published_at, as --since); default: when the run starts.")
@click.option("--topic", "topics", multiple=True, help="Events of this topic (repeatable).")
@click.option("--to-topic", default=None, help="Publish every record to this topic (default: each event's own).")
@click.option("--rate", type=click.FloatRange(min=0), default=None,
              help="Events per second at most (default 1000; 0: no cap; a resumed run keeps its own unless given).")
@click.option("--dry-run", is_flag=True, help="Count the selection and list its first ids; publish nothing.")
@click.option("--resume", "run_id", type=click.IntRange(min=1), default=None, metavar="RUN_ID",
              help="Continue an interrupted run after its last acknowledged event (its own selection and target).")
@click.option("--by", "operator", default=None, help="Who runs it, for the run's row and log line (default: $USER).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation of a selection over 10,000 events.")
def replay(keys: tuple[str, ...], id_from: int | None, id_to: int | None, since: object, until: object,
           topics: tuple[str, ...], to_topic: str | None, rate: float | None, dry_run: bool, run_id: int | None,
           operator: str | None, yes: bool) -> None:
    """Re-publish retained events (status published, kept OUTBOX_RETENTION_SECONDS) in per-key order.

    Filters combine with AND; none selects every retained event. Each record is built as the
    workers built it (key, value, headers, event-id included) plus a `kaireon-replay: RUN_ID`
    header: consumers choose to deduplicate on event-id. Replayed to its own topic, a row then
    records the new record's partition and offset.

    Interrupted (Ctrl-C, SIGTERM, a kill, a failed delivery), the run is resumed with
    `--resume RUN_ID` after its last acknowledged event: the only records sent twice are those that
    were in flight at the interruption. Exit 0 when finished, 1 on a failure, 130/143 after
    SIGINT/SIGTERM.
    """
    from kaireon_pub.ops import replay as ops_replay

    selection = ops_replay.Selection(keys=keys, id_from=id_from, id_to=id_to, since=since, until=until,  # type: ignore[arg-type]
                                     topics=topics)
    if run_id is not None and (selection != ops_replay.Selection() or to_topic is not None or dry_run):
        raise click.UsageError("--resume continues a run with its own selection and target: "
                               "give no --key, --id-from, --id-to, --since, --until, --topic, --to-topic or --dry-run")
    problem = selection.validate()
    if problem:
        raise click.UsageError(problem)
    if to_topic is not None:
        from kaireon_pub.worker.kafka.records import PoisonRow, check_topic

        try:
            check_topic(to_topic, set())
        except PoisonRow as exc:
            raise click.BadParameter(str(exc), param_hint="--to-topic") from None
    settings = load_settings()
    plan = ops_replay.Plan(selection=selection, to_topic=to_topic, rate=rate, run_id=run_id, operator=operator)

    def confirm(question: str) -> bool:
        try:
            return click.confirm(question, default=False, err=True)
        except click.Abort:  # no answer (stdin closed)
            return False
        finally:
            if not sys.stdin.isatty():
                click.echo("", err=True)  # a piped answer is not echoed: end the prompt's line

    sys.exit(ops_replay.run(settings, plan, dry_run=dry_run, yes=yes, confirm=confirm, echo=click.echo,
                            tty=sys.stderr.isatty()))


@cli.command()
@click.option("--topic", "topics", multiple=True, help="A topic the tier must be able to publish to (repeatable).")
@click.option("--auto-create/--no-auto-create", default=None,
              help="Whether the broker creates missing topics; unset: ask the broker.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
def check(topics: tuple[str, ...], auto_create: bool | None, as_json: bool) -> None:
    """Preflight: settings, producer safety, timeouts, database, schema, broker, topics.

    Exit 1 on any failure; 5 when the schema is missing or behind (run `kaireon-pub migrate`).
    """
    logs.configure("WARNING", secrets_of(os.environ))
    import orjson

    from kaireon_pub.ops.check import run_checks

    report = run_checks(topics=topics, auto_create=auto_create)
    click.echo(orjson.dumps(report.as_json()).decode() if as_json else report.render())
    sys.exit(ExitCode.SCHEMA_MISSING if report.schema_missing else ExitCode.CRASH if report.failed else ExitCode.OK)


@cli.command()
@click.option("--url", default="http://127.0.0.1:9464/metrics", show_default=True, help="The tier's /metrics.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1))
@click.option("--once", is_flag=True, help="Print one frame (after one interval) and exit.")
def top(url: str, interval: float, once: bool) -> None:
    """A live view of a running tier: events/s, backlog, ages, workers, failures."""
    from kaireon_pub.ops import top as ops_top

    sys.exit(ops_top.run(url, interval, once=once))


@cli.command()
@click.option("--role", required=True, help="The database role to grant to (it must exist).")
@click.option("--for", "kind", required=True, type=click.Choice(["runtime", "readonly"]),
              help="runtime: the tier (run, reap, requeue, replay); readonly: status, check and the KEDA trigger.")
@click.option("--schema", default="public", show_default=True, help="The schema of the outbox tables.")
@click.option("--read-all-stats/--no-read-all-stats", default=True, show_default=True,
              help="Grant pg_read_all_stats: the ages of other roles' transactions (README, \"Database roles\").")
def grants(role: str, kind: str, schema: str, read_all_stats: bool) -> None:
    """Print the GRANT statements a least-privilege role needs (run them as the tables' owner or a superuser).

    The owner role is the one `migrate` runs as; it owns the tables and needs nothing from here.
    """
    from kaireon_pub.ops import grants as ops_grants

    click.echo(ops_grants.statements(role, kind, schema=schema, read_all_stats=read_all_stats), nl=False)


@cli.command("call-reaper")
@click.option("--url", required=True,
              help="The tier's cron route, e.g. http://kaireon-pub:9464/api/v1/cron/outbox-reaper.")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds per attempt.")
@click.option("--retries", default=3, show_default=True, type=click.IntRange(min=0),
              help="Retries after a connection error, a timeout, a 5xx or a 429 (never after a 401).")
@click.option("--backoff", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds before the first retry; doubles per retry, at most 30.")
def call_reaper(url: str, timeout: float, retries: int, backoff: float) -> None:
    """Call the reaper route with CRON_SECRET from the environment (never the command line).

    Prints the route's JSON; exit 0 on a 200, 1 otherwise, 2 when CRON_SECRET is not set.
    """
    logs.configure("INFO", secrets_of(os.environ))
    from kaireon_pub.ops import call_reaper as ops_call_reaper

    problem = ops_call_reaper.url_problem(url)
    if problem:
        raise click.BadParameter(problem, param_hint="--url")
    sys.exit(ops_call_reaper.run(url, timeout=timeout, retries=retries, backoff=backoff))


# ---- proving delivery (kaireon_pub.ops.locate, kaireon_pub.ops.audit) ----------------------


@cli.command(epilog="Exit codes: 0 found and byte-equal; 10 no such row; 11 not published yet (pending, processing, "
                    "failed); 12 published without a recorded position; 13 missing on the broker (the position is "
                    "not stored, or holds another event); 14 differs (key or value); 1 a database or broker "
                    "failure; 5 the schema is behind.")
@click.argument("event_id", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
def locate(event_id: int, as_json: bool) -> None:
    """Where event EVENT_ID landed: its row (status, attempts, last error, times, topic, key) and,
    once published, its partition and offset; reads the record there back from the broker and
    checks its event-id, key and value against the row's bytes. Needs SELECT only."""
    settings = load_settings()
    from kaireon_pub.ops import locate as ops_locate

    sys.exit(ops_locate.run(settings, event_id, as_json=as_json, echo=click.echo))


@cli.command(epilog="Exit codes: 0 clean; 10 at least one finding; 1 a database or broker failure; "
                    "5 the schema is behind.")
@click.option("--since", callback=_when_option, default=None, metavar="TIME",
              help="Events published at or after TIME (ISO 8601, UTC when no zone; or 30m, 6h, 7d ago).")
@click.option("--until", callback=_when_option, default=None, metavar="TIME", help="Events published before TIME.")
@click.option("--topic", default=None, help="Events of this topic only.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
def audit(since: object, until: object, topic: str | None, as_json: bool) -> None:
    """Check the window's published events against the broker: each recorded position is read
    back and the events missing, altered (key or value), duplicated (the same event-id at another
    offset of the range read) and out of order within a key are reported. Rows without a recorded
    position are counted as unverifiable. A progress bar on a terminal; a summary line. Needs SELECT only."""
    settings = load_settings()
    from kaireon_pub.ops import audit as ops_audit

    window = ops_audit.Window(since=since, until=until, topic=topic)  # type: ignore[arg-type]
    sys.exit(ops_audit.run(settings, window, as_json=as_json, echo=click.echo, progress=sys.stderr.isatty()))


# ---- a Debezium outbox table (kaireon_pub.ops.debezium) --------------------------------------


@cli.command()
@click.option("--debezium-table", "table", required=True, metavar="SCHEMA.TABLE",
              help="The Debezium outbox table to publish from (its columns and indexes are left as they are).")
@click.option("--field-event-id", default="id", show_default=True, help="table.field.event.id: the `id` header.")
@click.option("--field-key", default="aggregateid", show_default=True, help="table.field.event.key: the key.")
@click.option("--field-payload", default="payload", show_default=True,
              help="table.field.event.payload: the value (jsonb, json, text, varchar, char or bytea).")
@click.option("--field-type", default="type", show_default=True,
              help="table.field.event.type: the event type kept in outbox_events ('' for none).")
@click.option("--route-by-field", default="aggregatetype", show_default=True, help="route.by.field.")
@click.option("--topic-template", default="outbox.event.${routedByValue}", show_default=True,
              help="route.topic.replacement: ${routedByValue} is the --route-by-field column's value.")
@click.option("--topic-regex", default=None, metavar="REGEX",
              help="route.topic.regex, a PostgreSQL regular expression over the whole value: ${routedByValue} "
                   "is its first group (a value it does not match is used whole).")
@click.option("--tombstone-on-empty-payload", is_flag=True,
              help="route.tombstone.on.empty.payload: an empty payload gives a tombstone (a null one always does).")
@click.option("--field-as-header", "headers", multiple=True, metavar="COLUMN[:NAME]",
              help="table.fields.additional.placement COLUMN:header:NAME (repeatable).")
@click.option("--tier-headers", is_flag=True, help="Also the tier's own event-id, event-type, created-at headers.")
@click.option("--lock-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for the table's lock (CREATE TRIGGER waits for its open writers).")
def attach(table: str, field_event_id: str, field_key: str, field_payload: str, field_type: str,
           route_by_field: str, topic_template: str, topic_regex: str | None, tombstone_on_empty_payload: bool,
           headers: tuple[str, ...], tier_headers: bool, lock_timeout: float) -> None:
    """Publish each row inserted into a Debezium outbox table, as the Outbox Event Router would
    (idempotent; no replication slot). Run as the owner of outbox_events."""
    from kaireon_pub.ops import debezium

    try:
        mapping = debezium.Mapping(
            event_id=field_event_id, key=field_key, payload=field_payload, event_type=field_type,
            route_by=route_by_field, topic_template=topic_template, topic_regex=topic_regex,
            tombstone_on_empty_payload=tombstone_on_empty_payload,
            headers=tuple(debezium.parse_header_field(h) for h in headers), tier_headers=tier_headers)
    except debezium.AttachError as exc:
        raise click.UsageError(str(exc)) from None
    settings = load_settings(need_kafka=False)
    sys.exit(debezium.run(settings, "attach", table, mapping=mapping, lock_timeout_s=lock_timeout, echo=click.echo))


@cli.command()
@click.option("--debezium-table", "table", required=True, metavar="SCHEMA.TABLE", help="An attached table.")
@click.option("--lock-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for the table's lock.")
def detach(table: str, lock_timeout: float) -> None:
    """Stop publishing a Debezium outbox table: its trigger and function go; the table is as it was
    (idempotent). Events already in outbox_events are still published."""
    settings = load_settings(need_kafka=False)
    from kaireon_pub.ops import debezium

    sys.exit(debezium.run(settings, "detach", table, lock_timeout_s=lock_timeout, echo=click.echo))


def main() -> None:
    cli()
