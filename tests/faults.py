"""Fault injection for the outside-in tests: a small TCP proxy and a broker that can be frozen.

`Proxy` forwards loopback TCP connections to a target port (or a unix socket: a PostgreSQL
server that listens on one only), in one of four modes:
- `pass`: bytes flow both ways;
- `blackhole`: nothing is forwarded in either direction, but every socket stays open (bytes
  already sent wait, as behind a network partition, and flow again when the mode is `pass`);
- `reset`: every connection, open or new, is closed with an RST (SO_LINGER 0, then close);
- `drop-replies`: requests are forwarded, replies are read and thrown away (the server does the
  work and answers; the client never hears of it, as when a connection breaks after a commit).
For PostgreSQL (`postgres=True`), `drop_replies_after(pattern)` drops the replies of one
connection from the next statement whose text contains `pattern` on, whichever the timing.

`database_proxy(url)` puts a `Proxy` in front of the server of a libpq URL and returns the URL
that goes through it. `StoppablePostgres` is an embedded PostgreSQL of a test's own that can be
stopped and started again on the same data and URL (a database outage).

`FaultBroker` is the dev broker (Tansu) that can advertise a proxy's address, so that every
client connection (bootstrap and the broker connections from metadata) goes through the proxy;
it can start with a given `--cluster-id` and be frozen (SIGSTOP) and thawed (SIGCONT).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import uuid
from pathlib import Path

import psycopg

from kaireon_pub.devenv import Broker, Postgres, free_port, wait_for_port

MODES = ("pass", "blackhole", "reset", "drop-replies")


def _rst(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _FrontendMessages:
    """Frames what a PostgreSQL client sends on one connection (the frontend protocol), to tell
    which statement each Bind (or simple Query) runs, prepared statements included."""

    SSL_OR_GSS_REQUEST = (80877103, 80877104)  # the startup message follows them

    def __init__(self) -> None:
        self.buf = bytearray()
        self.started = False
        self.statements: dict[bytes, bytes] = {}  # prepared name ('' unnamed) -> query text

    def feed(self, data: bytes) -> list[bytes]:
        """The query texts of the statements run by the complete messages in `data` so far."""
        self.buf += data
        run: list[bytes] = []
        while True:
            if not self.started:
                if len(self.buf) < 8:
                    break
                length, code = struct.unpack("!ii", self.buf[:8])
                if len(self.buf) < length:
                    break
                del self.buf[:length]
                self.started = code not in self.SSL_OR_GSS_REQUEST
                continue
            if len(self.buf) < 5:
                break
            kind, length = self.buf[0], struct.unpack("!i", self.buf[1:5])[0]
            if len(self.buf) < 1 + length:
                break
            body = bytes(self.buf[5:1 + length])
            del self.buf[:1 + length]
            if kind == ord("P"):
                name, _, rest = body.partition(b"\0")
                self.statements[name] = rest.split(b"\0", 1)[0]
            elif kind == ord("B"):
                _portal, _, rest = body.partition(b"\0")
                run.append(self.statements.get(rest.split(b"\0", 1)[0], b""))
            elif kind == ord("Q"):
                run.append(body.split(b"\0", 1)[0])
        return run


class _Connection:
    def __init__(self, proxy: Proxy, client: socket.socket, upstream: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.bytes = {"up": 0, "down": 0}
        self.dropped = 0
        # drop_replies_after(): from the statement that matched on, this connection's replies are dropped.
        self.dropping = False
        self.frontend = _FrontendMessages() if proxy.postgres else None
        for src, dst, direction in ((client, upstream, "up"), (upstream, client, "down")):
            threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True,
                             name=f"proxy-{proxy.port}-{direction}").start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while not self.closed.is_set():
                mode = self.proxy.mode
                if mode not in ("pass", "drop-replies"):
                    # Blackhole: leave the bytes unread (the kernel buffers hold them, the peer's
                    # writes eventually block), as a partition would. Reset is handled by the proxy.
                    self.proxy.mode_changed.wait(0.1)
                    continue
                readable, _, _ = select.select([src], [], [], 0.1)
                if not readable or self.proxy.mode != mode:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if direction == "up" and self.frontend is not None:
                    for query in self.frontend.feed(data):
                        if self.proxy._trigger_hit(query):
                            self.dropping = True
                if direction == "down" and (mode == "drop-replies" or self.dropping):
                    # The server did the work and answered; the client never hears of it.
                    self.dropped += len(data)
                    self.proxy.dropped += len(data)
                    continue
                dst.sendall(data)
                self.bytes[direction] += len(data)
        except OSError:
            pass
        self.close()

    def close(self, reset: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if reset:
                _rst(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        self.proxy._forget(self)


class Proxy:
    """A threaded TCP proxy on 127.0.0.1:`port` to 127.0.0.1:`target_port`, or to the unix
    socket `target_unix` (then `target_port` is ignored)."""

    def __init__(self, target_port: int, port: int | None = None, *, target_unix: str | None = None,
                 postgres: bool = False):
        self.target_port = target_port
        self.target_unix = target_unix
        self.postgres = postgres  # the PostgreSQL protocol: drop_replies_after() can see statements
        self.dropped = 0  # reply bytes thrown away (drop-replies mode, drop_replies_after)
        self.triggered = threading.Event()
        self._trigger: bytes | None = None
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.mode = "pass"
        self.mode_changed = threading.Event()
        self.accepted = 0
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(128)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"proxy-{self.port}")
        self._thread.start()

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.mode_changed.set()
        self.mode_changed.clear()
        if mode == "reset":
            for conn in self.connections():
                conn.close(reset=True)

    def drop_replies_after(self, pattern: bytes) -> None:
        """PostgreSQL only: the next statement whose text contains `pattern` goes on to the server,
        and from then on its connection's replies are dropped (`triggered` is set); one shot.
        Deterministic where a timed drop-replies is not: the reply lost is that statement's."""
        if not self.postgres:
            raise ValueError("drop_replies_after needs Proxy(postgres=True)")
        with self._lock:
            self.triggered.clear()
            self._trigger = pattern

    def _trigger_hit(self, query: bytes) -> bool:
        with self._lock:
            if self._trigger is None or self._trigger not in query:
                return False
            self._trigger = None
        self.triggered.set()
        return True

    def connections(self) -> list[_Connection]:
        with self._lock:
            return list(self._connections)

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            readable, _, _ = select.select([self._listener], [], [], 0.1)
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            self.accepted += 1
            if self.mode == "reset":
                _rst(client)
                continue
            try:
                upstream = self._connect_upstream()
            except OSError:
                # Nothing behind the proxy (the broker is down): refuse as the broker would.
                _rst(client)
                continue
            for sock in (client, upstream):
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, client, upstream)
            with self._lock:
                self._connections.add(conn)

    def _connect_upstream(self) -> socket.socket:
        if self.target_unix is None:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        else:
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.settimeout(5)
            try:
                upstream.connect(self.target_unix)
            except OSError:
                upstream.close()
                raise
        upstream.settimeout(None)
        return upstream

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        for conn in self.connections():
            conn.close()


def database_proxy(url: str) -> tuple[Proxy, str]:
    """A `Proxy` in front of the PostgreSQL server of `url` (a unix socket or a loopback TCP
    port), and the same URL through the proxy (127.0.0.1:<proxy port>)."""
    params = psycopg.conninfo.conninfo_to_dict(url)
    host = str(params.get("host") or "/tmp")
    port = int(str(params.get("port") or 5432))
    if host.startswith("/"):
        proxy = Proxy(0, target_unix=f"{host}/.s.PGSQL.{port}", postgres=True)
    else:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("database_proxy: loopback servers only")
        proxy = Proxy(port, postgres=True)
    return proxy, psycopg.conninfo.make_conninfo(url, host="127.0.0.1", port=str(proxy.port))


class StoppablePostgres(Postgres):
    """An embedded PostgreSQL of the test's own (whatever KAIREON_TEST_DATABASE_URL says), that
    `stop_server()` stops and `start_server()` starts again on the same data and the same URL."""

    def __init__(self):  # noqa: D107 - the embedded server only, never an external one
        self.datadir = Path(f"/tmp/kaireon-pg-{uuid.uuid4().hex[:8]}")
        self.datadir.mkdir(parents=True)
        self._server = None
        self._cleanup_mode = "delete"
        self._start_embedded()
        self.running = True

    def stop_server(self) -> None:
        """The outage: the server stops (fast shutdown: sessions end); its data is kept."""
        self._stop_embedded()
        self.running = False

    def start_server(self) -> None:
        url = self.admin_url
        self._start_embedded()
        self.running = True
        if self.admin_url != url:
            raise AssertionError(f"the restarted server has another URL: {self.admin_url} (was {url})")

    def close(self) -> None:
        if not self.running:
            self._start_embedded()  # stop() with cleanup mode "delete" removes the data directory
        self.stop()


class FaultBroker(Broker):
    """Tansu (memory storage) that may sit behind a `Proxy`, start with a cluster id, be frozen.

    With `proxied=True`, `bootstrap` is the proxy's address and the broker advertises it, so
    every connection of every client goes through `proxy`; `direct_bootstrap` bypasses it.
    `restart(cluster_id=...)` brings the broker back empty behind the same address.
    """

    def __init__(self, *, cluster_id: str | None = None, proxied: bool = False, log_path: Path | None = None):
        self.cluster_id = cluster_id
        self.proxy: Proxy | None = None
        self.paused = False
        self._proxy_port = free_port() if proxied else None
        super().__init__(log_path=log_path)
        self.direct_bootstrap = f"127.0.0.1:{self.port}"
        if proxied:
            self.proxy = Proxy(self.port, port=self._proxy_port)
            self.bootstrap = self.proxy.address

    def start(self) -> None:
        listen = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self._proxy_port or self.port}"
        args = [self.binary, "broker", "--listener-url", listen, "--advertised-listener-url", advertised,
                "--storage-engine", "memory://tansu/"]
        if self.cluster_id:
            args += ["--cluster-id", self.cluster_id]
        # Tansu also reads its settings from the environment: give it none of the caller's.
        env = {k: v for k, v in os.environ.items()
               if k not in ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=env)
        self.paused = False
        wait_for_port(self.port)

    def restart(self, cluster_id: str | None = None) -> None:
        self.stop()
        if cluster_id is not None:
            self.cluster_id = cluster_id
        self.start()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing is answered."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL, at once (no grace); `start()` may bring it back empty."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(5)
        self.stop()  # closes the log, waits for the port to be free

    def stop(self, grace: float = 0.5) -> None:
        if self.process is not None and self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.paused = False
        if self.process is not None and self.process.poll() is not None:
            # Already dead (kill()): only the bookkeeping is left.
            self.process = None
            self._log.close()
            return
        super().stop(grace)

    def close(self) -> None:
        self.stop()
        if self.proxy is not None:
            self.proxy.close()
