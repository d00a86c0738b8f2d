"""`kaireon-pub call-reaper`: call the tier's cron route, for a CronJob in the tier's own image.

The secret comes from CRON_SECRET in the environment only (a Secret's env var), never from the
command line, so it is in no process's argv. The call is a POST with an empty body and
`Authorization: Bearer <secret>`. It goes straight to the URL: no proxy from the environment
(the URL is the tier's in-cluster Service) and no redirect is followed (a redirect would carry
the secret to another address).

Attempts: 1 + `retries`. A connection error, a timeout, a 5xx or a 429 is retried after a
back-off (doubling from `backoff`, at most 30 s); any other answer (401 above all: a wrong
secret does not get better) ends the call. Exit 0 on a 200, whose JSON body is printed on
stdout; 1 otherwise (the last answer on stderr); 2 when CRON_SECRET is not set.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from kaireon_pub.errors import ExitCode, new_error_id
from kaireon_pub.redact import Redactor, secrets_of

log = logging.getLogger("kaireon_pub.ops.call_reaper")

MAX_BACKOFF_SECONDS = 30.0
MAX_BODY_BYTES = 64 * 1024
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no HTTP answer (connection refused, timeout, ...)
    body: str
    error: str | None = None

    @property
    def retriable(self) -> bool:
        return self.status is None or self.status in RETRIED_STATUSES


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        return None  # urllib then raises HTTPError with the 3xx itself


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def url_problem(url: str) -> str | None:
    """None when `url` is an http(s) URL with a host, else what is wrong with it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"--url must be an http:// or https:// URL with a host, got {url!r}"
    return None


def call_once(url: str, secret: str, timeout: float) -> Answer:
    request = urllib.request.Request(url, data=b"", method="POST", headers={
        "Authorization": f"Bearer {secret}", "Accept": "application/json", "User-Agent": "kaireon-pub call-reaper"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Answer(response.status, _text(response.read(MAX_BODY_BYTES)))
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(MAX_BODY_BYTES) if exc.fp is not None else b""
        except OSError:
            body = b""
        finally:
            exc.close()
        return Answer(exc.code, _text(body))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return Answer(None, "", f"{type(reason).__name__}: {reason}")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").strip()


def run(url: str, *, timeout: float, retries: int, backoff: float, env: dict[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """The command: call, retry what is worth retrying, print the answer; returns the exit code."""
    env = os.environ if env is None else env
    secret = env.get("CRON_SECRET", "").strip()
    if not secret:
        log.error("CRON_SECRET is not set: call-reaper reads the cron secret from the environment only",
                  extra={"event": "config invalid", "variable": "CRON_SECRET", "errorId": new_error_id()})
        return ExitCode.CONFIG

    hide = Redactor(secrets_of(env)).text

    attempts, attempt, delay = retries + 1, 0, backoff
    while True:
        attempt += 1
        answer = call_once(url, secret, timeout)
        if answer.status == 200:
            sys.stdout.write(hide(answer.body) + "\n")
            sys.stdout.flush()
            log.info("reaper route called", extra={"event": "call-reaper ok", "url": hide(url), "attempt": attempt})
            return ExitCode.OK
        what = f"HTTP {answer.status}" if answer.status is not None else hide(answer.error or "no answer")
        fields = {"event": "call-reaper failed", "errorId": new_error_id(), "url": hide(url), "attempt": attempt,
                  "attempts": attempts, "httpStatus": answer.status, "body": hide(answer.body)[:500]}
        if not answer.retriable or attempt == attempts:
            final = "gave up" if answer.retriable else "not retried"
            log.error(f"reaper route call failed ({what}); {final}", extra=fields)
            sys.stderr.write(f"call-reaper: {hide(url)} answered {what}"
                             + (f": {hide(answer.body)[:500]}" if answer.body else "")
                             + f" ({final} after {attempt} attempt{'s' if attempt > 1 else ''})\n")
            return ExitCode.CRASH
        log.warning(f"reaper route call failed ({what}); retrying in {delay:g} s",
                    extra={**fields, "retryInSeconds": delay})
        sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_SECONDS)
