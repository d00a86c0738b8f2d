"""The cron route's authentication, fail-closed: `authenticate(environ, CRON_SECRET)`.

- CRON_SECRET unset, empty, blank, or a rendered placeholder ("None", "null", "undefined")
  means the route answers 401 and the reaper does not run.
- The secret is accepted from `Authorization: Bearer <secret>` (the scheme is matched
  case-insensitively, as RFC 7235 says auth schemes are, so `bearer` works) or from
  `x-cron-secret: <secret>`. Every credential presented must match: with both headers, one
  wrong value is a 401, as is an Authorization header of another scheme.
- Comparison is on bytes (the header's wire bytes, which WSGI hands over as latin-1 code points,
  against CRON_SECRET encoded as UTF-8), through SHA-256 digests and hmac.compare_digest, so
  neither content nor length leaks through timing. A value that cannot be bytes is a 401.
- The configured secret and presented values are compared stripped of surrounding whitespace (a
  trailing newline in a mounted secret is a classic outage).
- The 401 body is the same whatever the reason; the reason goes to the log only.
- Rotation: `CronSecrets` gives the secrets accepted now: CRON_SECRET, and CRON_SECRET_PREVIOUS
  until it is removed or CRON_SECRET_PREVIOUS_EXPIRES_AT passes. Each presented value must match
  one of them. A secret given as a file (CRON_SECRET_FILE, CRON_SECRET_PREVIOUS_FILE) is read
  again when the file changes (mtime, inode or size: a Kubernetes Secret volume swaps a symlink),
  so a rotation takes effect without a restart. A file that cannot be read or holds a secret
  shorter than 16 bytes makes that secret unusable (fail closed, one log line with an errorId)
  until the file is fixed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from kaireon_pub.errors import ConfigError, new_error_id
from kaireon_pub.settings import (
    PLACEHOLDER_SECRETS,
    Settings,
    cron_secret_problem,
    read_secret_file,
)

log = logging.getLogger("kaireon_pub.http")

# Values a template renders for a missing secret; configured as CRON_SECRET they mean "unset",
# so a caller rendering the same placeholder (`Bearer None`) can never match.
_PLACEHOLDER_SECRETS = PLACEHOLDER_SECRETS


def authenticate(environ: Mapping[str, object], configured: str | None | Sequence[str | None]) -> str | None:
    """None when the request carries the cron secret (or, during a rotation, one of the accepted
    secrets: pass them as a sequence, the current one first); otherwise the reason (for the log only)."""
    secrets = [configured] if configured is None or isinstance(configured, str) else list(configured)
    if not secrets or not _usable(secrets[0]):
        return "CRON_SECRET is not set"
    expected = [hashlib.sha256(s.strip().encode("utf-8")).digest() for s in secrets if s is not None and _usable(s)]

    presented: list[str | None] = []
    authorization = environ.get("HTTP_AUTHORIZATION")
    if authorization is not None:
        scheme, _, token = str(authorization).strip().partition(" ")
        presented.append(token.strip() if scheme.lower() == "bearer" else None)
    header = environ.get("HTTP_X_CRON_SECRET")
    if header is not None:
        presented.append(str(header).strip())
    if not presented:
        return "no credentials presented"
    # Check every credential against every accepted secret (no short-circuit), so the timing
    # does not tell which one failed.
    matches = [_matches(value, expected) for value in presented]
    return None if all(matches) else "credentials do not match"


def _usable(secret: str | None) -> bool:
    text = (secret or "").strip()
    return bool(text) and text.lower() not in _PLACEHOLDER_SECRETS


def _matches(value: str | None, expected_digests: Sequence[bytes]) -> bool:
    if not value:
        return False
    try:
        # PEP 3333: header bytes arrive as latin-1 code points; this recovers the wire bytes.
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    digest = hashlib.sha256(raw).digest()
    found = [hmac.compare_digest(digest, expected) for expected in expected_digests]
    return any(found)


_UNSEEN = (-1, -1, -1)  # no stat of a file is this


class _FileSecret:
    """A secret given inline, or read from a file and read again when the file changes."""

    def __init__(self, variable: str, value: str | None, path: str):
        self.variable = variable
        self.value = value
        self.path = path
        # Nothing of the file seen yet: the first current() reads it. The value Settings read may
        # be stale (read once when the supervisor started; an HTTP child respawned after a
        # rotation builds its secrets anew and must serve the file as it is now).
        self._seen: tuple[int, int, int] | None = _UNSEEN

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows the symlink a Secret volume swaps on rotation
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def current(self) -> str | None:
        if not self.path:
            return self.value
        seen = self._identity()
        if seen != self._seen:
            self._seen = seen
            self.value = self._reread()
        return self.value

    def _reread(self) -> str | None:
        try:
            value = read_secret_file(self.variable, self.path)
            problem = cron_secret_problem(value)
            if problem is not None:
                raise ConfigError(self.variable, problem, "at least 16 bytes")
        except ConfigError as exc:
            log.error(f"{self.variable} changed and is refused: {exc.problem}; the cron route refuses "
                      "this secret until the file is fixed",
                      extra={"event": "cron secret refused", "errorId": new_error_id(), "variable": self.variable})
            return None
        if value != self.value:
            log.info(f"{self.variable} changed; the cron route accepts the new secret",
                     extra={"event": "cron secret reloaded", "variable": self.variable})
        return value


class CronSecrets:
    """The cron secrets accepted now: `accepted()` -> [CRON_SECRET, CRON_SECRET_PREVIOUS (while
    in its window)], the files re-read when they change."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time):
        self.current = _FileSecret("CRON_SECRET_FILE", settings.cron_secret, settings.cron_secret_file)
        self.previous = _FileSecret("CRON_SECRET_PREVIOUS_FILE", settings.cron_secret_previous,
                                    settings.cron_secret_previous_file)
        self.expires_at = settings.cron_secret_previous_expires_at
        self.clock = clock
        self._lock = threading.Lock()

    def accepted(self) -> list[str | None]:
        with self._lock:
            secrets = [self.current.current()]
            previous = self.previous.current()
            if previous is not None and (self.expires_at is None or self.clock() < self.expires_at):
                secrets.append(previous)
            return secrets
