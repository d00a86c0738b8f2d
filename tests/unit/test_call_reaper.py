"""`kaireon-pub call-reaper` against a small scripted HTTP server: the header, the retries, the
exit codes, and the secret in no output."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kaireon_pub.ops import call_reaper

SECRET = "cron-SENTINEL-" + uuid.uuid4().hex
OK_BODY = {"status": "ok", "stalenessSeconds": 300, "resetCount": 2, "durationMs": 3,
           "timestamp": "2026-04-30T14:20:00.000Z"}


class Scripted:
    """Answers each request with the next (status, body, headers) of the script; records requests."""

    def __init__(self, *script: tuple[int, object] | tuple[int, object, dict[str, str]]):
        self.script = list(script)
        self.requests: list[dict[str, object]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                outer.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                       "body": self.rfile.read(length)})
                status, body, *more = outer.script.pop(0) if outer.script else (500, {"error": "script ended"})
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in (more[0] if more else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1/cron/outbox-reaper"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def sleeps() -> list[float]:
    return []


def call(url: str, sleeps: list[float], *, retries: int = 3, env: dict[str, str] | None = None,
         timeout: float = 5) -> int:
    return call_reaper.run(url, timeout=timeout, retries=retries, backoff=1.0,
                           env={"CRON_SECRET": SECRET} if env is None else env, sleep=sleeps.append)


def no_secret(capsys, caplog) -> str:
    out, err = capsys.readouterr()
    everything = out + err + caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert SECRET not in everything
    return out


def test_a_200_prints_the_json_and_exits_0(sleeps, capsys, caplog):
    with Scripted((200, OK_BODY)) as server:
        assert call(server.url, sleeps) == 0
    (req,) = server.requests
    assert req["method"] == "POST" and req["path"] == "/api/v1/cron/outbox-reaper" and req["body"] == b""
    assert req["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert json.loads(no_secret(capsys, caplog)) == OK_BODY
    assert sleeps == []


def test_5xx_and_429_are_retried_with_a_doubling_backoff(sleeps, capsys, caplog):
    with Scripted((503, {"status": "not ready"}), (500, {"status": "error", "errorId": "ab12"}),
                  (429, {}), (200, OK_BODY)) as server:
        assert call(server.url, sleeps) == 0
    assert len(server.requests) == 4
    assert sleeps == [1.0, 2.0, 4.0]
    assert json.loads(no_secret(capsys, caplog)) == OK_BODY


def test_a_401_is_not_retried(sleeps, capsys, caplog):
    with Scripted((401, {"error": "unauthorized"}), (200, OK_BODY)) as server:
        assert call(server.url, sleeps) == 1
    assert len(server.requests) == 1 and sleeps == []
    out, err = capsys.readouterr()
    assert out == ""
    assert 'answered HTTP 401: {"error": "unauthorized"} (not retried after 1 attempt)' in err
    assert SECRET not in err + caplog.text


def test_retries_run_out_after_persistent_5xx(sleeps, capsys, caplog):
    with Scripted(*[(500, {"status": "error", "errorId": "e1"})] * 3) as server:
        assert call(server.url, sleeps, retries=2) == 1
    assert len(server.requests) == 3 and sleeps == [1.0, 2.0]
    err = capsys.readouterr().err
    assert "answered HTTP 500" in err and "gave up after 3 attempts" in err and '"errorId": "e1"' in err


def test_connection_errors_are_retried(sleeps, capsys, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        assert call(f"http://127.0.0.1:{port}/api/v1/cron/outbox-reaper", sleeps, retries=2) == 1
    assert sleeps == [1.0, 2.0]
    assert "ConnectionRefusedError" in capsys.readouterr().err
    assert [r.levelname for r in caplog.records].count("WARNING") == 2


def test_the_backoff_is_capped(sleeps, capsys):
    with Scripted(*[(502, {})] * 8) as server:
        assert call(server.url, sleeps, retries=7) == 1
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_redirect_is_not_followed(sleeps, capsys, caplog):
    with Scripted((200, OK_BODY)) as target, Scripted((307, {}, {"Location": target.url})) as server:
        assert call(server.url, sleeps) == 1
    assert target.requests == []  # the secret never went to the other address
    assert "answered HTTP 307" in capsys.readouterr().err


@pytest.mark.parametrize("value", [None, "", "   "])
def test_no_secret_in_the_environment_exits_2_without_calling(value, sleeps, capsys, caplog):
    with Scripted((200, OK_BODY)) as server:
        assert call(server.url, sleeps, env={} if value is None else {"CRON_SECRET": value}) == 2
    assert server.requests == []
    assert "CRON_SECRET is not set" in caplog.text


def cli(*args: str, env: dict[str, str]) -> object:
    import subprocess

    base = {k: v for k, v in os.environ.items() if k not in ("CRON_SECRET", "DATABASE_URL")}
    return subprocess.run([sys.executable, "-m", "kaireon_pub", "call-reaper", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_the_command_reads_the_secret_from_the_environment_only():
    with Scripted((200, OK_BODY), (401, {"error": "unauthorized"})) as server:
        done = cli("--url", server.url, env={"CRON_SECRET": SECRET})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == OK_BODY
        assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
        refused = cli("--url", server.url, "--retries", "0", env={"CRON_SECRET": SECRET})
        assert refused.returncode == 1
        assert SECRET not in done.stdout + done.stderr + refused.stdout + refused.stderr
        missing = cli("--url", server.url, env={})
        assert missing.returncode == 2 and "CRON_SECRET is not set" in missing.stderr
        assert len(server.requests) == 2
    # There is no option for the secret: it cannot end up in argv.
    assert "--secret" not in cli("--help", env={}).stdout.lower()


def test_a_url_that_is_not_http_is_a_usage_error():
    done = cli("--url", "ftp://example.org/x", env={"CRON_SECRET": SECRET})
    assert done.returncode == 2 and "--url must be an http:// or https:// URL" in done.stderr
