"""The `kaireon-pub` command line: parses, hands off, holds no logic of its own."""

from __future__ import annotations

import logging
import sys

import click

from kaireon_pub import logs
from kaireon_pub.errors import ConfigError, ExitCode, new_error_id
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.cli")


def load_settings(*, need_kafka: bool = True) -> Settings:
    """Settings from the environment, or one line naming the problem and exit code 2."""
    logs.configure("INFO")
    try:
        settings = Settings.from_env(need_kafka=need_kafka)
    except ConfigError as exc:
        log.error(
            f"invalid configuration: {exc}",
            extra={"errorId": new_error_id(), "variable": exc.variable, "problem": exc.problem,
                   "accepted": exc.accepted, "event": "config invalid"},
        )
        sys.exit(ExitCode.CONFIG)
    logs.configure(settings.log_level)
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
def migrate() -> None:
    """Create or upgrade the schema (idempotent; safe to run from several pods at once)."""
    settings = load_settings(need_kafka=False)
    from kaireon_pub.db.connect import connect
    from kaireon_pub.db.migrate import migrate as apply

    with connect(settings, "migrate") as conn:
        applied = apply(conn)
    for m in applied:
        log.info(f"applied migration {m.version:04d}_{m.name}", extra={"event": "migration applied", "version": m.version})
    if not applied:
        log.info("schema is up to date", extra={"event": "migration none"})


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


def main() -> None:
    cli()
