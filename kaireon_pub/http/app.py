"""The tier's HTTP surface as one WSGI application: /metrics, /healthz, /readyz, the cron route.

Routes and methods:
  GET|HEAD  /metrics                     prometheus-client exposition (multiprocess when configured)
  GET|HEAD  /healthz[?maxStaleSeconds=N] 200 while the liveness file is fresher than N s (90)
  GET|HEAD  /readyz                      200 when every readiness check is true, else 503 (the
                                         last check's answer: checks run every few seconds on a
                                         thread of their own, never per request)
  POST      /api/v1/cron/outbox-reaper   runs the reaper, one run at a time: while one is in
                                         flight another authenticated call is a 429 with Retry-After

Order of refusals: unknown path 404, method 405 (with Allow), body over 1 KiB or of unknown
length 413, then (cron route) authentication 401, then a run in flight 429. (Behind waitress a
chunked body arrives de-chunked, with its length: the server buffers it up to its own limit.)
GET, HEAD and OPTIONS never reach the reaper.
Every refusal and failure logs one line with an errorId; a 500 body holds only that errorId.

The parts beside the routes: cron authentication (cron_auth.py), the default readiness
(readiness.py), the multiprocess metrics collector (collector.py). What stays here is the routing
and each route's answer, one job (just past 300 lines, most of it the refusals' answers).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import orjson

from kaireon_pub.errors import new_error_id
from kaireon_pub.http.collector import ScrapeSafeCollector
from kaireon_pub.http.cron_auth import CronSecrets, authenticate
from kaireon_pub.http.readiness import CachedReadiness, DefaultReadiness
from kaireon_pub.reaper import RESULT_KEYS, ReaperError, reap
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings
from kaireon_pub.supervisor.liveness import file_age

log = logging.getLogger("kaireon_pub.http")

CRON_PATH = "/api/v1/cron/outbox-reaper"
# POST only: a GET must not change state (a crawler, a prefetch or a proxy may send one).
CRON_METHODS = ("POST",)
# What a 429 asks the caller to wait: a run takes milliseconds, at worst a statement timeout.
CRON_RETRY_AFTER_SECONDS = 5
PROBE_METHODS = ("GET", "HEAD")
MAX_BODY_BYTES = 1024
# A refused body up to this size is read and dropped, so closing the socket does not reset the
# connection before the client has read the 413.
_DRAIN_LIMIT = 64 * 1024
DEFAULT_MAX_STALE_SECONDS = 90.0
PROBE_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
ROUTE_PATHS = PROBE_PATHS | {CRON_PATH}
# The same body whether the secret is unset or wrong.
UNAUTHORIZED = {"error": "unauthorized"}

Readiness = Callable[[], Mapping[str, bool]]
Reaper = Callable[..., Mapping[str, object]]  # reap(settings, *, source) -> result
StartResponse = Callable[..., Any]


class Response(NamedTuple):
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 413: "Content Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _json(status: int, payload: object, *headers: tuple[str, str]) -> Response:
    return Response(status, orjson.dumps(payload), headers)


def make_app(settings: Settings, *, readiness: Readiness | None = None,
             reaper: Reaper | None = None) -> _App:
    """The WSGI application. `readiness() -> {"database": bool, "broker": bool, ...}` defaults
    to `DefaultReadiness(settings)` behind a `CachedReadiness` (its thread starts at the app's
    `start()` or first /readyz, ends at `close()`); `reaper(settings, *, source)` defaults to
    `reaper.reap`."""
    return _App(settings, readiness or CachedReadiness(DefaultReadiness(settings)), reaper or reap)


class _App:
    def __init__(self, settings: Settings, readiness: Readiness, reaper: Reaper):
        self.settings = settings
        self.readiness = readiness
        self.reaper = reaper
        self.cron_secrets = CronSecrets(settings)
        # One reaper run at a time: a second call is told to come back, not parked on a thread.
        self._cron_running = threading.Lock()
        self._metrics_app: Callable | None = None
        self._metrics_lock = threading.Lock()
        self.routes: dict[str, tuple[tuple[str, ...], Callable[[dict], Response]]] = {
            "/metrics": (PROBE_METHODS, self.metrics),
            "/healthz": (PROBE_METHODS, self.healthz),
            "/readyz": (PROBE_METHODS, self.readyz),
            CRON_PATH: (CRON_METHODS, self.cron),
        }

    def start(self) -> None:
        """Starts what runs beside the requests (the readiness refresh), in the serving process."""
        start = getattr(self.readiness, "start", None)
        if start is not None:
            start()

    def close(self) -> None:
        stop = getattr(self.readiness, "stop", None)
        if stop is not None:
            stop(0.2)  # a check in flight is a daemon thread: the child need not wait it out

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        try:
            response = self.dispatch(environ, method)
        except Exception as exc:
            response = self.failure(environ, exc)
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))),
                   ("Cache-Control", "no-store"), *response.headers]
        start_response(f"{response.status} {_REASONS.get(response.status, 'Unknown')}", headers)
        # HEAD gets the GET's headers and no body.
        return [] if method == "HEAD" else [response.body]

    def dispatch(self, environ: dict, method: str) -> Response:
        route = self.routes.get(environ.get("PATH_INFO", ""))
        if route is None:
            return self.refuse(environ, 404, "unknown path", {"error": "not found"})
        methods, handler = route
        if method not in methods:
            return self.refuse(environ, 405, "method not allowed", {"error": "method not allowed"},
                               ("Allow", ", ".join(methods)))
        refused = self.check_body(environ)
        if refused is not None:
            return refused
        return handler(environ)

    # ---- refusals and failures -------------------------------------------------------------

    def refuse(self, environ: dict, status: int, reason: str, payload: object,
               *headers: tuple[str, str], level: int = logging.INFO) -> Response:
        log.log(level, f"http request refused: {reason}",
                extra={"event": "http refused", "errorId": new_error_id(), "status": status,
                       "reason": reason, **self.request_fields(environ)})
        return _json(status, payload, *headers)

    def failure(self, environ: dict, exc: BaseException, error_id: str | None = None) -> Response:
        """A 500 whose body is only the errorId; the log line has the (redacted) cause."""
        if error_id is None:
            error_id = new_error_id()
            text = "".join(traceback.format_exception(exc))
            log.error("http handler failed",
                      extra={"event": "http failed", "errorId": error_id,
                             "errorType": type(exc).__name__,
                             "traceback": redact(text, self.settings),
                             **self.request_fields(environ)})
        return _json(500, {"errorId": error_id})

    def request_fields(self, environ: dict) -> dict[str, object]:
        return {"method": str(environ.get("REQUEST_METHOD", ""))[:16],
                "path": loggable_path(str(environ.get("PATH_INFO", ""))),
                "remote": environ.get("REMOTE_ADDR", "")}

    def check_body(self, environ: dict) -> Response | None:
        # A chunked body has no length to check up front; refuse it rather than read it.
        if environ.get("HTTP_TRANSFER_ENCODING"):
            return self.refuse(environ, 413, "body of unknown length", {"error": "request body too large"},
                               level=logging.WARNING)
        text = str(environ.get("CONTENT_LENGTH") or "").strip()
        if not text:
            return None
        try:
            length = int(text)
            if length < 0:
                raise ValueError
        except ValueError:
            return self.refuse(environ, 400, "invalid Content-Length", {"error": "invalid Content-Length"})
        if length > MAX_BODY_BYTES:
            if length <= _DRAIN_LIMIT:
                self.drain(environ, length)
            return self.refuse(environ, 413, "body too large", {"error": "request body too large"},
                               level=logging.WARNING)
        self.drain(environ, length)  # no route reads a body; drop it
        return None

    @staticmethod
    def drain(environ: dict, length: int) -> None:
        stream = environ.get("wsgi.input")
        if stream is None or length == 0:
            return
        try:
            stream.read(length)
        except OSError:
            pass  # the client went away or timed out; the response write will notice

    # ---- routes ----------------------------------------------------------------------------

    def metrics(self, environ: dict) -> Response:
        app = self.exposition_app()
        captured: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
            captured["status"], captured["headers"] = status, headers

        # prometheus-client answers HEAD with 405; it gets a GET, and __call__ drops the body.
        body = b"".join(app({**environ, "REQUEST_METHOD": "GET"}, start_response))
        headers = dict(captured["headers"])
        content_type = headers.pop("Content-Type", "text/plain; charset=utf-8")
        headers.pop("Content-Length", None)
        return Response(int(captured["status"].split(" ", 1)[0]), body, tuple(headers.items()),
                        content_type)

    def exposition_app(self) -> Callable:
        """prometheus-client's own WSGI exposition (Accept negotiation, gzip, name[] filters)."""
        with self._metrics_lock:
            if self._metrics_app is None:
                from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

                path = self.settings.prometheus_multiproc_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
                if path:
                    # Every process's files are read at each scrape.
                    registry = CollectorRegistry()
                    registry.register(ScrapeSafeCollector(path))
                else:
                    registry = REGISTRY  # single process (no multiprocess directory configured)
                self._metrics_app = make_wsgi_app(registry)
            return self._metrics_app

    def healthz(self, environ: dict) -> Response:
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        max_stale = DEFAULT_MAX_STALE_SECONDS
        if "maxStaleSeconds" in query:
            try:
                max_stale = float(query["maxStaleSeconds"][-1])
                if not math.isfinite(max_stale) or max_stale <= 0:
                    raise ValueError
            except ValueError:
                return self.refuse(environ, 400, "invalid maxStaleSeconds",
                                   {"error": "maxStaleSeconds must be a positive number"})
        age = file_age(self.settings.liveness_file)
        if age is None:
            return self.unhealthy(environ, {"status": "missing", "maxStaleSeconds": max_stale})
        body = {"status": "ok" if age <= max_stale else "stale", "ageSeconds": round(age, 3),
                "maxStaleSeconds": max_stale}
        if age > max_stale:
            return self.unhealthy(environ, body)
        return _json(200, body)

    def unhealthy(self, environ: dict, body: dict[str, object]) -> Response:
        log.warning("liveness file is not fresh",
                    extra={"event": "healthz failed", "errorId": new_error_id(),
                           "livenessFile": self.settings.liveness_file, **body,
                           **self.request_fields(environ)})
        return _json(503, body)

    def readyz(self, environ: dict) -> Response:
        try:
            checks = {str(name): bool(ok) for name, ok in dict(self.readiness()).items()}
        except Exception as exc:
            error_id = new_error_id()
            log.error("readiness check failed",
                      extra={"event": "readyz failed", "errorId": error_id,
                             "errorType": type(exc).__name__,
                             "error": redact(str(exc), self.settings), **self.request_fields(environ)})
            return _json(503, {"status": "not ready", "errorId": error_id})
        ready = bool(checks) and all(checks.values())
        if not ready:
            log.warning("not ready", extra={"event": "readyz not ready", "errorId": new_error_id(),
                                            "checks": checks, **self.request_fields(environ)})
        return _json(200 if ready else 503, {"status": "ready" if ready else "not ready", "checks": checks})

    def cron(self, environ: dict) -> Response:
        denied = authenticate(environ, self.cron_secrets.accepted())
        if denied is not None:
            return self.refuse(environ, 401, denied, UNAUTHORIZED,
                               ("WWW-Authenticate", 'Bearer realm="kaireon-pub"'), level=logging.WARNING)
        if not self._cron_running.acquire(blocking=False):
            return self.refuse(environ, 429, "a reaper run is in flight", {"error": "a reaper run is in flight"},
                               ("Retry-After", str(CRON_RETRY_AFTER_SECONDS)))
        try:
            result = self.reaper(self.settings, source="http")
        except ReaperError as exc:
            # Already logged (with the cause) under this id; the client gets the same id.
            return self.failure(environ, exc, exc.error_id)
        finally:
            self._cron_running.release()
        return _json(200, {key: result[key] for key in RESULT_KEYS})


def loggable_path(path: str) -> str:
    """The path for a log line. Never headers or the query string (where secrets travel), and
    only the tier's own paths: any other path is client-chosen text, possibly a secret."""
    return path if path in ROUTE_PATHS else "(other)"


