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
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

# Values a template renders for a missing secret; configured as CRON_SECRET they mean "unset",
# so a caller rendering the same placeholder (`Bearer None`) can never match.
_PLACEHOLDER_SECRETS = frozenset({"none", "null", "undefined", "nil"})


def authenticate(environ: Mapping[str, object], configured: str | None) -> str | None:
    """None when the request carries the cron secret; otherwise the reason (for the log only)."""
    secret = (configured or "").strip()
    if not secret or secret.lower() in _PLACEHOLDER_SECRETS:
        return "CRON_SECRET is not set"
    expected = hashlib.sha256(secret.encode("utf-8")).digest()

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
    # Check every credential (no short-circuit), so the timing does not tell which one failed.
    matches = [_matches(value, expected) for value in presented]
    return None if all(matches) else "credentials do not match"


def _matches(value: str | None, expected_digest: bytes) -> bool:
    if not value:
        return False
    try:
        # PEP 3333: header bytes arrive as latin-1 code points; this recovers the wire bytes.
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(hashlib.sha256(raw).digest(), expected_digest)
