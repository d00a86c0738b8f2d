"""The HTTP server: waitress, serving the WSGI app of `kaireon_pub.http.app`.

It runs in a child process of its own (the supervisor stays single-threaded and socket-free):
the supervisor forks and calls `http_child_main`. waitress reads requests on one thread (an
asyncore loop) and hands complete requests to a fixed pool of threads, so a slow client holds a
connection, never a thread. The limits (`Limits`, defaults below):

- at most `connections` open connections; beyond that waitress stops accepting, and new
  connections wait in the listen backlog until one closes;
- `threads` requests run at once; complete requests beyond that wait in waitress's queue;
- a connection silent for `channel_timeout` seconds (a client that sent half a request, or an
  idle keep-alive connection) is closed;
- the request line and headers together are at most `header_bytes` (431 beyond), a body at most
  `body_bytes` (413 beyond; the app itself refuses any body over 1 KiB);
- HTTP/1.1 keep-alive: every answer has a Content-Length.

waitress's own answers (400, 413, 431, 500) are JSON like the app's, `{"error": "http 431"}`
(a 500 carries only an errorId), and each logs one line with an errorId. Request logging goes
to the JSON logger: method, path (the tier's own paths only, never the query string), status,
size, remote address; successful probe requests (/metrics, /healthz, /readyz) at DEBUG, the
rest at INFO. Headers are never logged: they carry the cron secret. waitress's loggers
(`waitress`, `waitress.queue`) reach the same JSON handler, with the tier's secrets redacted.

One job past 300 lines: waitress set up as the tier needs it (limits, its own answers and log
lines, the child process's signals and stop), each part small and tied to the others.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import orjson
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

from kaireon_pub import logs
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.http.app import PROBE_PATHS, loggable_path, make_app
from kaireon_pub.reaper import redact
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.http")

# waitress's loggers; both propagate to the root logger (the tier's JSON handler).
WAITRESS_LOGGERS = ("waitress", "waitress.queue")
# How often the child checks that its supervisor still exists.
_ORPHAN_CHECK_SECONDS = 1.0
# On stop, how long in-flight requests get before the server closes anyway (a reaper run cut
# short rolls back). With the readiness thread's 0.2 s (app.close) it stays inside the 0.7 s the
# supervisor gives the child before SIGKILL (supervisor/children.py).
_STOP_GRACE_SECONDS = 0.3
# Signals the supervisor may have handlers for; in the child they get their defaults back.
_INHERITED_SIGNALS = ("SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGTTIN", "SIGTTOU", "SIGWINCH")


@dataclass(frozen=True)
class Limits:
    threads: int = 8
    connections: int = 64
    channel_timeout: int = 10  # seconds; waitress takes whole seconds
    header_bytes: int = 64 * 1024
    body_bytes: int = 64 * 1024
    backlog: int = 64


LIMITS = Limits()


# ---- waitress's own answers and log lines ---------------------------------------------------


class _ErrorTask(ErrorTask):
    """waitress's answer to a request it refuses (bad syntax, headers or body too large) or
    to an application that raised: a JSON body, one log line with an errorId."""

    def execute(self) -> None:
        error = self.request.error
        code = int(getattr(error, "code", 500))
        error_id = new_error_id()
        remote = self.channel.addr[0] if self.channel.addr else ""
        if code == 500:  # the application raised (501 is a client's unsupported Transfer-Encoding)
            log.error("http server error",
                      extra={"event": "http failed", "errorId": error_id, "status": code, "remote": remote})
            body = orjson.dumps({"errorId": error_id})
        else:
            # error.body may quote the request; only the code is kept.
            log.warning("http protocol error",
                        extra={"event": "http protocol error", "errorId": error_id, "status": code,
                               "reason": getattr(error, "reason", ""), "remote": remote})
            body = orjson.dumps({"error": f"http {code}"})
        self.status = f"{code} {getattr(error, 'reason', 'Error')}"
        self.response_headers.extend([("Content-Type", "application/json"), ("Cache-Control", "no-store")])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    error_task_class = _ErrorTask


class _RedactingFilter(logging.Filter):
    """On waitress's loggers: the message without the tier's secrets (waitress quotes request
    paths, e.g. "Exception while serving /..."), a traceback field instead of exc_info (also
    redacted), and an errorId on warnings and errors."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self.settings)[:500]
        record.args = ()
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            record.traceback = redact(text, self.settings)
            record.errorType = record.exc_info[0].__name__ if record.exc_info[0] else None
            record.exc_info = None
            record.exc_text = None
        if not hasattr(record, "event"):
            record.event = "http server"
        if record.levelno >= logging.WARNING and not hasattr(record, "errorId"):
            record.errorId = new_error_id()
        return True


def _install_log_filter(settings: Settings) -> Callable[[], None]:
    """Adds the redacting filter to waitress's loggers; returns the function that removes it."""
    flt = _RedactingFilter(settings)
    loggers = [logging.getLogger(name) for name in WAITRESS_LOGGERS]
    for logger in loggers:
        logger.addFilter(flt)

    def remove() -> None:
        for logger in loggers:
            logger.removeFilter(flt)

    return remove


def access_logged(app: Callable) -> Callable:
    """WSGI middleware: one "http request" line per request answered by `app`."""

    def logged(environ: dict, start_response: Callable) -> Iterable[bytes]:
        seen: list[str] = []

        def capture(status: str, headers: list, exc_info: object = None) -> Callable:
            seen.append(status)
            return start_response(status, headers, exc_info)

        result = app(environ, capture)
        try:
            chunks = list(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        try:
            status = int(seen[-1].split(" ", 1)[0]) if seen else 0
        except ValueError:
            status = 0
        path = loggable_path(str(environ.get("PATH_INFO", "")))
        # Probes come every few seconds from kubelet, Prometheus and `top`; only their
        # failures are worth an INFO line.
        level = logging.DEBUG if path in PROBE_PATHS and 0 < status < 400 else logging.INFO
        log.log(level, "http request",
                extra={"event": "http request", "method": str(environ.get("REQUEST_METHOD", ""))[:16],
                       "path": path, "status": status, "bytes": sum(len(c) for c in chunks),
                       "remote": environ.get("REMOTE_ADDR", "")})
        return chunks

    return logged


# ---- serving --------------------------------------------------------------------------------


def _listening_socket(settings: Settings) -> socket.socket:
    # Bound here rather than by waitress: an IPv6 host such as "::" keeps the dual-stack socket
    # it had (waitress sets IPV6_V6ONLY), and a bind error is an OSError before anything runs.
    family = socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.http_host, settings.http_port))
    except BaseException:
        sock.close()
        raise
    return sock


def make_server(settings: Settings, app: Callable, limits: Limits = LIMITS) -> tuple[BaseWSGIServer, dict]:
    """A listening waitress server for `app` and its socket map (not yet serving)."""
    sock = _listening_socket(settings)
    socket_map: dict = {}
    try:
        server = create_server(
            access_logged(app), map=socket_map, sockets=[sock],
            threads=limits.threads,
            # waitress counts its listening socket and its wake-up pipe among the connections.
            connection_limit=limits.connections + 2,
            channel_timeout=limits.channel_timeout,
            cleanup_interval=1,  # how often silent connections are looked for
            max_request_header_size=limits.header_bytes,
            max_request_body_size=limits.body_bytes,
            backlog=limits.backlog,
            ident="kaireon-pub",
            expose_tracebacks=False,
            clear_untrusted_proxy_headers=True,
            asyncore_use_poll=True,
        )
    except BaseException:
        sock.close()
        raise
    server.channel_class = _Channel
    return server, socket_map


def serve_forever(settings: Settings, stop_event: threading.Event | None = None,
                  ready: Callable[[int], None] | None = None, *, app: Callable | None = None,
                  limits: Limits = LIMITS) -> None:
    """Serve `app` (default `make_app(settings)`) on settings.http_host:http_port until
    `stop_event` is set. Port 0 binds a free port; `ready(port)` gets the bound port once the
    socket listens. Bind errors (OSError) propagate before `ready` is called."""
    stop_event = stop_event or threading.Event()
    remove_filter = _install_log_filter(settings)
    owned = make_app(settings) if app is None else None
    try:
        server, socket_map = make_server(settings, app or owned, limits)
        if owned is not None:
            owned.start()  # the readiness refresh: a thread of this (forked) process
        try:
            # The stop thread wakes the loop at once instead of at its next poll timeout.
            threading.Thread(target=_wake_when_set, args=(server, stop_event),
                             name="http-stop", daemon=True).start()
            if ready is not None:
                ready(int(server.effective_port))
            while not stop_event.is_set():
                wasyncore.loop(timeout=1.0, use_poll=True, map=socket_map, count=1)
        finally:
            # The task threads first: one still running pulls the trigger when it ends, and after
            # close_all that wrote a byte to a closed descriptor, or to whatever reused its number.
            server.task_dispatcher.shutdown(cancel_pending=True, timeout=_STOP_GRACE_SECONDS)
            wasyncore.close_all(socket_map, ignore_all=True)
    finally:
        if owned is not None:
            owned.close()
        remove_filter()


def _wake_when_set(server: BaseWSGIServer, stop_event: threading.Event) -> None:
    stop_event.wait()
    try:
        server.pull_trigger()
    except OSError:
        pass  # already closed: the loop has ended


def http_child_main(settings: Settings, port_report_fd: int | None) -> int:
    """Entry point of the forked HTTP child. Returns its exit code:
    0 after SIGTERM/SIGINT or the supervisor's death, 4 (ExitCode.WORKER_BOOT) when it cannot
    bind, 1 on an unexpected error. Writes the bound port, ASCII and a newline, to
    `port_report_fd` (then closes it) once listening; the fd is closed on a failure too."""
    logs.set_role("http")
    stop = threading.Event()
    # The supervisor's handlers (and its wakeup fd) must not run in this process.
    signal.set_wakeup_fd(-1)
    for name in _INHERITED_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)

    def on_stop_signal(signum: int, frame: object) -> None:
        stop.set()  # only sets the event; the stop thread wakes the loop

    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(), stop),
                     name="http-orphan-check", daemon=True).start()

    # Normally the supervisor made (and wiped) it; prometheus-client fails without it.
    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if multiproc_dir:
        os.makedirs(multiproc_dir, exist_ok=True)

    fd = port_report_fd
    bound = False

    def on_ready(port: int) -> None:
        nonlocal fd, bound
        bound = True
        log.info(f"http server listening on {settings.http_host}:{port}",
                 extra={"event": "http listening", "host": settings.http_host, "port": port})
        if fd is not None:
            try:
                os.write(fd, f"{port}\n".encode("ascii"))
            finally:
                os.close(fd)
                fd = None

    try:
        serve_forever(settings, stop, on_ready)
    except OSError as exc:
        error_id = new_error_id()
        log.error("http server cannot bind" if not bound else "http server failed",
                  extra={"event": "http boot failed" if not bound else "http failed",
                         "errorId": error_id, "host": settings.http_host, "port": settings.http_port,
                         "errorType": type(exc).__name__, "error": redact(str(exc), settings)})
        return ExitCode.CRASH if bound else ExitCode.WORKER_BOOT
    except Exception as exc:
        log.error("http server failed",
                  extra={"event": "http failed", "errorId": new_error_id(),
                         "errorType": type(exc).__name__,
                         "traceback": redact("".join(traceback.format_exception(exc)), settings)})
        return ExitCode.CRASH
    finally:
        if fd is not None:
            os.close(fd)  # the supervisor's read sees EOF instead of waiting
    log.info("http server stopped", extra={"event": "http stopped"})
    return ExitCode.OK


def _stop_when_orphaned(parent: int, stop: threading.Event) -> None:
    while not stop.wait(_ORPHAN_CHECK_SECONDS):
        if os.getppid() != parent:
            log.warning("supervisor is gone; http server stopping", extra={"event": "http orphaned"})
            stop.set()
            return
