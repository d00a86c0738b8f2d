"""`make run`: the tier on the embedded defaults, under a demo load, with a progress line.

Starts an embedded PostgreSQL (data kept in .run/pgdata) and a Tansu broker on a free loopback
port, migrates, starts `kaireon-pub run` and a load generator that commits events through
`kaireon_pub.enqueue_many`, and prints one progress line a second. Ctrl-C drains and stops
everything. `--load-only` only generates load against DATABASE_URL (used by docker-compose).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import psycopg

from kaireon_pub import Event, enqueue_many

TOPIC = "demo.orders.v1"


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


@click.command()
@click.option("--rate", default=500, show_default=True, help="Events per second offered.")
@click.option("--workers", default=2, show_default=True)
@click.option("--load-only", is_flag=True, help="Only generate load against DATABASE_URL.")
def main(rate: int, workers: int, load_only: bool) -> None:
    stop = threading.Event()
    if load_only:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            generate_load(os.environ["DATABASE_URL"], rate, stop)
        except KeyboardInterrupt:
            pass
        return

    from kaireon_pub.db.migrate import migrate
    from kaireon_pub.devenv import Broker, Postgres, free_port

    run_dir = Path(".run").absolute()
    run_dir.mkdir(exist_ok=True)
    click.echo("starting embedded PostgreSQL (.run/pgdata) and the Tansu broker ...")
    pg = Postgres(run_dir / "pgdata", keep=True)
    broker = Broker(log_path=run_dir / "broker.log")
    database_url = pg.ensure_database("kaireon_demo")
    with psycopg.connect(database_url, autocommit=True) as conn:
        applied = migrate(conn)
    click.echo(f"migrated ({len(applied)} new migrations); broker at {broker.bootstrap}")
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
           "OUTBOX_WORKERS": str(workers), "OUTBOX_HTTP_PORT": str(port),
           "OUTBOX_LIVENESS_FILE": str(run_dir / "outbox-publisher.alive"),
           "PROMETHEUS_MULTIPROC_DIR": str(run_dir / "metrics"), "CRON_SECRET": "demo-secret"}
    tier_log = open(run_dir / "tier.log", "ab")  # noqa: SIM115 - closed below
    # Its own session: Ctrl-C reaches only this process, which forwards one SIGTERM (a drain).
    tier = subprocess.Popen([sys.executable, "-m", "kaireon_pub", "run"], env=env,
                            stdout=tier_log, stderr=subprocess.STDOUT, start_new_session=True)
    click.echo(f"tier running (pid {tier.pid}); logs in .run/tier.log; metrics at "
               f"http://127.0.0.1:{port}/metrics; live view: kaireon-pub top --url http://127.0.0.1:{port}/metrics")
    load = threading.Thread(target=generate_load, args=(database_url, rate, stop), daemon=True)
    load.start()
    click.echo(f"offering {rate} events/s on topic {TOPIC}; Ctrl-C to stop")
    last = counts(database_url).get("published", 0)
    last_t = time.monotonic()
    try:
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
        click.echo(f"the tier exited with code {tier.returncode}; see .run/tier.log", err=True)
    except KeyboardInterrupt:
        click.echo("\nstopping: the tier drains (at most 15 s) ...")
    finally:
        stop.set()
        if tier.poll() is None:
            tier.send_signal(signal.SIGTERM)
        try:
            code = tier.wait(30)
        except subprocess.TimeoutExpired:
            tier.kill()
            code = tier.wait()
        tier_log.close()
        final = counts_safe(database_url)
        broker.stop()
        pg.stop()
        click.echo(f"tier exit code {code}; rows by status: {final or 'n/a (database unreachable)'}")


def counts_safe(database_url: str) -> dict[str, int] | None:
    try:
        return counts(database_url)
    except psycopg.Error:
        return None


if __name__ == "__main__":
    main()
