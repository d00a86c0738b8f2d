"""The HTTP server (waitress) on a real socket, in-process, with a fake reaper and readiness.

Slow clients, header and body limits, the connection limit, keep-alive, prompt stops, access
log levels and waitress's own log lines; the routes' answers are tests/unit/test_cron_auth.py.
"""

from __future__ import annotations

import http.client
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import orjson
import pytest

from kaireon_pub import logs
from kaireon_pub.http.app import CRON_PATH, make_app
from kaireon_pub.http.server import LIMITS, Limits, serve_forever
from kaireon_pub.settings import Settings

SECRET = "s3cret-Cron-value"
RESULT = {"status": "ok", "stalenessSeconds": 300, "resetCount": 0, "durationMs": 1,
          "timestamp": "2026-04-30T14:20:00.000Z"}


def settings_for(tmp_path, **changes: object) -> Settings:
    fields: dict[str, object] = {"http_host": "127.0.0.1", "http_port": 0, **changes}
    return Settings(database_url="postgresql://reaper@127.0.0.1:1/unused", kafka_bootstrap_servers="",
                    cron_secret=SECRET, liveness_file=str(tmp_path / "alive"), **fields)


def default_app(settings: Settings) -> Callable:
    return make_app(settings, readiness=lambda: {"database": True, "broker": True},
                    reaper=lambda settings, *, source: dict(RESULT))


@contextmanager
def serving(settings: Settings, app: Callable | None = None, limits: Limits = LIMITS) -> Iterator[int]:
    """serve_forever in a thread; yields the port; stops it and checks it returned promptly."""
    stop = threading.Event()
    ports: list[int] = []
    listening = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            serve_forever(settings, stop, lambda port: (ports.append(port), listening.set()),
                          app=app or default_app(settings), limits=limits)
        except BaseException as exc:
            failed.append(exc)
            listening.set()

    thread = threading.Thread(target=run, name="test-http")
    thread.start()
    try:
        assert listening.wait(10), "the server did not report its port"
        assert not failed, failed
        yield ports[0]
    finally:
        stop.set()
        thread.join(5)
        assert not thread.is_alive(), "serve_forever did not return within 5 s of stop"


def keep_alive(stack: ExitStack, port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    stack.callback(conn.close)
    return conn


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def get(port: int, path: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def read_response(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (bounded by the socket timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def readable_within(sock: socket.socket, seconds: float) -> bool:
    return bool(select.select([sock], [], [], seconds)[0])


# ---- slow clients, limits ----------------------------------------------------------------------

def test_a_client_that_sends_half_a_request_blocks_no_one_and_is_cut_off(tmp_path):
    (tmp_path / "alive").touch()
    # One thread only: if the half request held it, nothing else would be answered.
    limits = Limits(threads=1, channel_timeout=1)
    with serving(settings_for(tmp_path), limits=limits) as port, connect(port) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: headers unfinished
        for _ in range(3):
            assert get(port, "/healthz")[0] == 200
        # Silent for channel_timeout: the server closes the connection without an answer.
        slow.settimeout(10)
        assert read_response(slow) == b""


def test_headers_over_the_limit_are_431_json_and_logged_without_their_content(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    limits = Limits(header_bytes=8 * 1024)
    with serving(settings_for(tmp_path), limits=limits) as port:
        status, headers, body = get(port, "/healthz", {"X-Big": "secret-ish-" + "a" * 9000})
        assert (status, headers["Content-Type"], orjson.loads(body)) == (431, "application/json", {"error": "http 431"})
        # Many small headers count too; so does a long request line.
        status, _, _ = get(port, "/healthz", {f"X-H{i}": "v" * 100 for i in range(100)})
        assert status == 431
        assert get(port, "/healthz?" + "q" * 9000)[0] == 431
        # Under the limit, the same route answers.
        (tmp_path / "alive").touch()
        assert get(port, "/healthz", {"X-Small": "a" * 1000})[0] == 200
    errors = [r for r in caplog.records if getattr(r, "event", None) == "http protocol error"]
    assert [r.status for r in errors] == [431, 431, 431]
    assert all(r.levelname == "WARNING" and r.errorId for r in errors)
    assert all("secret-ish" not in logs.JsonFormatter().format(r) for r in caplog.records)


def test_a_malformed_request_is_400_json(tmp_path):
    with serving(settings_for(tmp_path)) as port, connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        head, _, body = read_response(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and orjson.loads(body) == {"error": "http 400"}


def test_a_body_over_the_server_limit_is_413_without_being_read(tmp_path):
    with serving(settings_for(tmp_path)) as port, connect(port) as sock:
        # Declared, never sent: the answer comes at once rather than after the body.
        sock.sendall(f"POST {CRON_PATH} HTTP/1.1\r\nHost: x\r\nx-cron-secret: {SECRET}\r\n"
                     "Content-Length: 10000000\r\n\r\n".encode())
        head, _, body = read_response(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ") and orjson.loads(body) == {"error": "http 413"}


def test_beyond_the_connection_limit_a_connection_waits_until_one_closes(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    (tmp_path / "alive").touch()
    limits = Limits(connections=3, channel_timeout=60)
    with serving(settings_for(tmp_path), limits=limits) as port, ExitStack() as stack:
        held = [keep_alive(stack, port) for _ in range(limits.connections)]
        for conn in held:  # each is accepted and served, then kept open (keep-alive)
            conn.request("GET", "/healthz")
            assert conn.getresponse().read()
        extra = stack.enter_context(connect(port))
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert not readable_within(extra, 0.5), "a connection beyond the limit was served"
        held[0].close()
        assert read_response(extra).startswith(b"HTTP/1.1 200 ")
    limit_lines = [r for r in caplog.records if r.name == "waitress" and "connection limit" in r.getMessage()]
    assert limit_lines and limit_lines[0].levelname == "WARNING"
    # waitress's own lines come with the tier's fields and format as JSON.
    assert limit_lines[0].event == "http server" and limit_lines[0].errorId
    assert orjson.loads(logs.JsonFormatter().format(limit_lines[0]))["logger"] == "waitress"


def test_keep_alive_serves_several_requests_on_one_connection(tmp_path):
    (tmp_path / "alive").touch()
    with serving(settings_for(tmp_path)) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            first = conn.sock
            for path in ("/metrics", "/readyz", "/nope", CRON_PATH):
                conn.request("POST" if path == CRON_PATH else "GET", path, headers={"x-cron-secret": SECRET})
                resp = conn.getresponse()
                resp.read()
                assert resp.status in (200, 404)
                assert conn.sock is first, f"the connection was closed after {path}"
            conn.request("HEAD", "/metrics")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"")
            assert conn.sock is first
        finally:
            conn.close()


def test_stop_is_prompt_with_connections_open(tmp_path):
    (tmp_path / "alive").touch()
    with ExitStack() as stack:
        port = stack.enter_context(serving(settings_for(tmp_path)))
        half = stack.enter_context(connect(port))
        half.sendall(b"GET /healthz HTTP/1.1\r\n")
        idle = keep_alive(stack, port)
        idle.request("GET", "/healthz")
        idle.getresponse().read()
        started = time.monotonic()
        stack.pop_all().close()  # leaves `serving`, which asserts the join within 5 s
        assert time.monotonic() - started < 3


# ---- logging -------------------------------------------------------------------------------------

def test_successful_probes_log_at_debug_the_rest_at_info(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    (tmp_path / "alive").touch()
    not_ready = make_app(settings_for(tmp_path), readiness=lambda: {"database": True, "broker": False},
                         reaper=lambda settings, *, source: dict(RESULT))
    with serving(settings_for(tmp_path)) as port:
        for path in ("/metrics", "/healthz", "/readyz"):
            assert get(port, path)[0] == 200
        assert get(port, CRON_PATH, {"x-cron-secret": SECRET}, "POST")[0] == 200
        assert get(port, CRON_PATH, method="POST")[0] == 401
        assert get(port, "/nope")[0] == 404
    with serving(settings_for(tmp_path), app=not_ready) as port:
        assert get(port, "/readyz")[0] == 503
    lines = [(r.path, r.status, r.levelname) for r in caplog.records if getattr(r, "event", None) == "http request"]
    assert lines == [("/metrics", 200, "DEBUG"), ("/healthz", 200, "DEBUG"), ("/readyz", 200, "DEBUG"),
                     (CRON_PATH, 200, "INFO"), (CRON_PATH, 401, "INFO"), ("(other)", 404, "INFO"),
                     ("/readyz", 503, "INFO")]


def test_an_app_that_raises_is_a_json_500_and_waitress_logs_it_redacted(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)

    def broken(environ, start_response):
        raise RuntimeError(f"boom near {SECRET}")

    with serving(settings_for(tmp_path), app=broken) as port:
        status, headers, body = get(port, f"/{SECRET}")
    assert status == 500 and headers["Content-Type"] == "application/json"
    error_id = orjson.loads(body)["errorId"]
    assert any(getattr(r, "errorId", None) == error_id and r.levelname == "ERROR" for r in caplog.records)
    from_waitress = [r for r in caplog.records if r.name.startswith("waitress")]
    assert from_waitress, "waitress logged nothing about the exception"
    for record in from_waitress:
        assert record.exc_info is None  # the traceback is a field, redacted
    formatted = [logs.JsonFormatter().format(r) for r in caplog.records]
    assert any("RuntimeError" in line for line in formatted)
    assert all(SECRET not in line for line in formatted)


# ---- the child process ---------------------------------------------------------------------------

CHILD = """
import sys
from kaireon_pub import logs
from kaireon_pub.settings import Settings
from kaireon_pub.http.server import http_child_main
logs.configure("INFO")
sys.exit(http_child_main(Settings.from_env(need_kafka=False), int(sys.argv[1])))
"""


def test_child_reports_its_port_logs_only_json_and_stops_promptly_on_sigterm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "KAFKA_"))}
    env.update(DATABASE_URL="postgresql://nobody@127.0.0.1:1/unused", OUTBOX_HTTP_HOST="127.0.0.1",
               OUTBOX_HTTP_PORT="0", OUTBOX_LIVENESS_FILE=str(tmp_path / "alive"), CRON_SECRET=SECRET,
               PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(write_fd)], env=env, pass_fds=(write_fd,),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(write_fd)
    try:
        assert select.select([read_fd], [], [], 30)[0], "no port report within 30 s"
        port = int(os.read(read_fd, 64))
        with ExitStack() as stack:
            # Fill the default connection limit, so waitress itself logs (a warning).
            for _ in range(LIMITS.connections):
                stack.enter_context(connect(port)).sendall(b"GET /healthz HTTP/1.1\r\n")
            extra = stack.enter_context(connect(port))
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not readable_within(extra, 0.5)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            assert time.monotonic() - started < 3
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=15)
        print(stderr)
    lines = [orjson.loads(line) for line in stderr.splitlines()]  # every line is JSON
    assert {line["role"] for line in lines} == {"http"}
    assert any(line["logger"] == "waitress" and "connection limit" in line["msg"] for line in lines)
    assert lines[-1]["event"] == "http stopped"


def test_an_ipv6_host_is_served(tmp_path):
    host = "::1"
    (tmp_path / "alive").touch()
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind((host, 0))
    except OSError:
        pytest.skip("IPv6 loopback unavailable")
    with serving(settings_for(tmp_path, http_host=host)) as port:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
        finally:
            conn.close()


def test_a_chunked_body_is_bounded_by_the_server_then_judged_by_its_length(tmp_path):
    def chunked(body: bytes) -> bytes:
        return (f"POST {CRON_PATH} HTTP/1.1\r\nHost: x\r\nx-cron-secret: {SECRET}\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + \
            f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"

    with serving(settings_for(tmp_path)) as port:
        with connect(port) as sock:
            sock.sendall(chunked(b"{}"))
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        with connect(port) as sock:
            sock.sendall(chunked(b"x" * 2048))
            head, _, body = read_response(sock).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413 ")
            assert orjson.loads(body) == {"error": "request body too large"}


def test_an_unsupported_transfer_encoding_is_a_501_refusal_not_a_server_error(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with serving(settings_for(tmp_path)) as port, connect(port) as sock:
        sock.sendall(f"POST {CRON_PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".encode())
        head, _, body = read_response(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 ") and orjson.loads(body) == {"error": "http 501"}
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "http protocol error"]
    assert [(r.status, r.levelname) for r in refusals] == [(501, "WARNING")]
