"""A real PgBouncer (the Debian package: 1.18) in front of the test PostgreSQL, for the tests and the bench.

`PgBouncer(upstream_url)` writes its own ini and userlist into a fresh directory, starts
`pgbouncer` as a process of its own on a free loopback port (pool_mode=transaction unless told
otherwise, auth_type trust, every database of the upstream through the `*` entry) and waits until
it answers. The embedded server listens on a unix socket in its data directory: PgBouncer reaches it
with `host=<that directory>`. Run as root, PgBouncer refuses to start; it is then started with
`-u <the owner of the socket directory>`, the one user that can reach the socket.

`binary()` is None when PgBouncer is not installed; callers skip with `SKIP_REASON`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from kaireon_pub.devenv import free_port, wait_for_port

SKIP_REASON = "pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)"


def binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)


class PgBouncer:
    def __init__(self, upstream_url: str, *, pool_mode: str = "transaction", pool_size: int = 8,
                 max_client_conn: int = 400, extra: dict[str, str] | None = None):
        exe = binary()
        if exe is None:
            raise RuntimeError(SKIP_REASON)
        self.upstream_url = upstream_url
        info = psycopg.conninfo.conninfo_to_dict(upstream_url)
        self.user = str(info.get("user") or pwd.getpwuid(os.getuid()).pw_name)
        host = str(info.get("host") or "/var/run/postgresql")
        port = str(info.get("port") or 5432)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kaireon-pgbouncer-"))
        password = str(info.get("password") or "")
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.dir / "userlist.txt"),
            "pool_mode": pool_mode,
            "default_pool_size": str(pool_size),
            "max_client_conn": str(max_client_conn),
            "admin_users": self.user,
            "stats_users": self.user,
            "logfile": str(self.dir / "pgbouncer.log"),
            "pidfile": str(self.dir / "pgbouncer.pid"),
            "server_login_retry": "1",
            **(extra or {}),
        }
        upstream = f"host={host} port={port}" + (f" password={password}" if password else "")
        ini = ("[databases]\n* = " + upstream + "\n\n[pgbouncer]\n"
               + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.dir / "pgbouncer.ini").write_text(ini)
        (self.dir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        command = [exe, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # PgBouncer will not run as root: run it as whoever owns the server's socket directory.
            owner = pwd.getpwuid(Path(host).stat().st_uid).pw_name if host.startswith("/") else "nobody"
            os.chmod(self.dir, 0o755)
            for path in [self.dir, *self.dir.iterdir()]:
                shutil.chown(path, user=owner)
            command[1:1] = ["-u", owner]
        self._log = open(self.dir / "stdout.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.port, timeout=15)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"pgbouncer did not start: {self.log_text()[-2000:]}") from None

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def url_for(self, direct_url: str) -> str:
        """The pooler's URL of the database a direct URL names."""
        return self.url(str(psycopg.conninfo.conninfo_to_dict(direct_url).get("dbname")))

    def log_text(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def admin(self, command: str) -> list[tuple]:
        """A command of the admin console (SHOW POOLS, SHOW SERVERS, …)."""
        with psycopg.connect(self.url("pgbouncer"), autocommit=True, prepare_threshold=None) as conn:
            return conn.execute(command).fetchall()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # shut down at once, closing every connection
            deadline = time.monotonic() + 5
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def bouncer_fixture(pg):
    """PgBouncer in pool_mode=transaction in front of the session's PostgreSQL; a test module
    makes it its fixture: `_bouncer = pytest.fixture(scope="session", name="bouncer")(bouncer_fixture)`."""
    if binary() is None:
        pytest.skip(SKIP_REASON)
    b = PgBouncer(pg.admin_url, pool_mode="transaction")
    yield b
    b.stop()
