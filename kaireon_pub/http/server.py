"""The HTTP server: the standard library's wsgiref behind socketserver.ThreadingMixIn.

It runs in a child process of its own (the supervisor stays single-threaded and socket-free):
the supervisor forks and calls `http_child_main`. Each request gets a daemon thread, at most
`MAX_CONCURRENT_REQUESTS` at once; a connection beyond that is closed at once. One request per
connection (wsgiref), with a socket timeout, so a slow client holds a thread for a bounded time.

Request logging goes to the JSON logger: method, path (no query string), status, size, remote
address. Headers are never logged: they carry the cron secret.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Callable
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

import orjson

from kaireon_pub import logs
from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.http.app import loggable_path, make_app
from kaireon_pub.reaper import redact
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.http")

MAX_CONCURRENT_REQUESTS = 32
REQUEST_TIMEOUT_SECONDS = 10
# How often the child checks that its supervisor still exists.
_ORPHAN_CHECK_SECONDS = 1.0
# Signals the supervisor may have handlers for; in the child they get their defaults back.
_INHERITED_SIGNALS = ("SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGTTIN", "SIGTTOU", "SIGWINCH")


class _ServerHandler(ServerHandler):
    """wsgiref's per-request handler; errors go to the JSON log and the client sees an errorId."""

    _error_id = ""

    def log_exception(self, exc_info) -> None:  # type: ignore[override]
        self._error_id = new_error_id()
        settings = self.request_handler.server.settings  # type: ignore[attr-defined]
        log.error("http server error",
                  extra={"event": "http failed", "errorId": self._error_id,
                         "errorType": exc_info[0].__name__ if exc_info[0] else None,
                         "traceback": redact("".join(traceback.format_exception(*exc_info)), settings)})

    def error_output(self, environ, start_response):  # type: ignore[override]
        body = orjson.dumps({"errorId": self._error_id})
        start_response("500 Internal Server Error",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                       sys.exc_info())
        return [body]


class _RequestHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_SECONDS
    # Protocol errors (bad request line, oversized headers) answer without echoing the request.
    error_message_format = '{"error":"http %(code)d"}'
    error_content_type = "application/json"

    def handle(self) -> None:
        # wsgiref's handle(), with our ServerHandler (JSON errors) and multithread=True.
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = ""
            self.request_version = ""
            self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = _ServerHandler(self.rfile, self.wfile, self.get_stderr(), self.get_environ(),
                                 multithread=True)
        handler.request_handler = self
        handler.run(self.server.get_app())

    def _path(self) -> str:
        # Unquoted as wsgiref does for PATH_INFO, so the same paths count as the tier's own.
        raw = (getattr(self, "path", "") or "").split("?", 1)[0]
        return loggable_path(urllib.parse.unquote(raw, "iso-8859-1"))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        try:
            status = int(code)
        except (TypeError, ValueError):
            status = 0
        log.info("http request",
                 extra={"event": "http request", "method": (getattr(self, "command", "") or "")[:16],
                        "path": self._path(), "status": status, "bytes": size,
                        "remote": self.client_address[0]})

    def log_error(self, format: str, *args: object) -> None:
        # http.server's protocol errors ("code 400, message Bad request syntax (...)"): the
        # message may quote the request line, so only the code is kept.
        code = args[0] if args and isinstance(args[0], int) else None
        log.warning("http protocol error",
                    extra={"event": "http protocol error", "errorId": new_error_id(), "status": code,
                           "remote": self.client_address[0]})

    def log_message(self, format: str, *args: object) -> None:
        log.info(redact(format % args, self.server.settings)[:500],  # type: ignore[attr-defined]
                 extra={"event": "http server"})


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Do not wait for in-flight requests on close: a reaper run cut short rolls back.
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, settings: Settings, app: Callable):
        self.settings = settings
        self.address_family = socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        super().__init__((settings.http_host, settings.http_port), _RequestHandler)
        self.set_app(app)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup that can hang); skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            log.warning("http connection dropped: too many requests in flight",
                        extra={"event": "http overloaded", "errorId": new_error_id(),
                               "remote": client_address[0], "limit": MAX_CONCURRENT_REQUESTS})
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        # socketserver's default prints a traceback to stderr.
        exc = sys.exc_info()[1]
        log.error("http connection error",
                  extra={"event": "http failed", "errorId": new_error_id(),
                         "errorType": type(exc).__name__ if exc else None,
                         "error": redact(str(exc), self.settings), "remote": client_address[0]})


def serve_forever(settings: Settings, stop_event: threading.Event | None = None,
                  ready: Callable[[int], None] | None = None, *, app: Callable | None = None) -> None:
    """Serve `app` (default `make_app(settings)`) on settings.http_host:http_port until
    `stop_event` is set. Port 0 binds a free port; `ready(port)` gets the bound port once the
    socket listens. Bind errors (OSError) propagate before `ready` is called."""
    server = _Server(settings, app or make_app(settings))
    try:
        port = int(server.server_address[1])
        if stop_event is not None:
            # shutdown() must come from another thread than serve_forever's.
            threading.Thread(target=_shutdown_when_set, args=(server, stop_event),
                             name="http-stop", daemon=True).start()
        if ready is not None:
            ready(port)
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()


def _shutdown_when_set(server: _Server, stop_event: threading.Event) -> None:
    stop_event.wait()
    server.shutdown()


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
        stop.set()  # only sets the event; the stop thread does the work

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
