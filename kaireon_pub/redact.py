"""The one redaction of the tier: every log line, `reap`, `check`, `status` and the HTTP child use it.

What is secret is said once, here:
- `SECRET_SETTINGS`: the environment variables whose value is a secret (CRON_SECRET and
  CRON_SECRET_PREVIOUS, libpq's PGPASSWORD) or holds one (the password of DATABASE_URL and
  OUTBOX_LISTEN_DATABASE_URL), whether given inline or as a file (NAME_FILE: the value read from
  the file is the secret, as is any secret KAFKA_*_FILE's);
- `is_secret_property` (defined in settings, which reads KAFKA_*_FILE by it): the librdkafka
  properties (KAFKA_* pass-through) that hold a secret, by pattern, after librdkafka's
  CONFIGURATION.md: every password, passphrase and client secret (`sasl.password`,
  `ssl.key.password`, `ssl.keystore.password`, `sasl.oauthbearer.client.secret` and its alias,
  `sasl.oauthbearer.assertion.private.key.passphrase`), every private key given inline
  (`ssl.key.pem`, `sasl.oauthbearer.assertion.private.key.pem`), and `sasl.oauthbearer.config`,
  whose name=value pairs may carry credentials. Certificates (`ssl.certificate.pem`, `ssl.ca.pem`,
  `https.ca.pem`) and file paths are public.

`Redactor` replaces those values with `***`, and anything shaped like a credential in a
connection string (`user:password@`, `password=…`), whoever quotes it.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from kaireon_pub.errors import ConfigError
from kaireon_pub.settings import (  # is_secret_property: settings needs it too (KAFKA_*_FILE); said here
    FILE_SUFFIX,
    KAFKA_PREFIX,
    is_secret_property,
    is_service_link,
    kafka_property,
    read_secret_file,
)

if TYPE_CHECKING:
    from kaireon_pub.settings import Settings

# Environment variable -> (what in its value is secret, the Settings field that holds it).
# PGPASSWORD is libpq's own: no Settings field, read from the environment.
SECRET_SETTINGS: Mapping[str, tuple[str, str | None]] = {
    "DATABASE_URL": ("password", "database_url"),
    "OUTBOX_LISTEN_DATABASE_URL": ("password", "listen_database_url"),
    "CRON_SECRET": ("value", "cron_secret"),
    "CRON_SECRET_PREVIOUS": ("value", "cron_secret_previous"),
    "PGPASSWORD": ("value", None),
}


# Credentials in connection strings, whatever wrote them: URI userinfo and key=value pairs.
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s\"']*):(?P<password>[^@\s\"']*)@", re.I)
_KV_PASSWORD = re.compile(r"(?P<key>\b(?:password|passwd|sasl\.password|ssl\.key\.password)\s*[=:]\s*)"
                          r"(?P<quote>['\"]?)(?P<value>[^\s'\",}]+)", re.I)
MIN_SECRET_LENGTH = 3  # shorter values would blank out ordinary text
HIDDEN = "***"


def redacted_producer_config(config: Mapping[str, str]) -> dict[str, str]:
    """The librdkafka configuration with every secret property's value as ***."""
    return {k: (HIDDEN if is_secret_property(k) else v) for k, v in config.items()}


def secrets_of(env: Mapping[str, str]) -> list[str]:
    """Every secret value in an environment (SECRET_SETTINGS and the secret KAFKA_* properties),
    longest first; for what must redact before (or without) valid Settings: `check`, the CLI.
    A secret given as NAME_FILE is read from its file (one that cannot be read is skipped)."""
    env = with_file_values(env)
    kafka = {kafka_property(name): value for name, value in env.items()
             if name.startswith(KAFKA_PREFIX) and not is_service_link(name) and not name.endswith(FILE_SUFFIX)}
    return _collect({name: env.get(name) for name in SECRET_SETTINGS}, kafka)


def with_file_values(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus NAME for every NAME_FILE of a secret setting or a KAFKA_* property, read from its file."""
    read: dict[str, str] = {}
    for name, path in env.items():
        inline = name[: -len(FILE_SUFFIX)]
        if (not name.endswith(FILE_SUFFIX) or not str(path).strip()
                or not (inline in SECRET_SETTINGS or inline.startswith(KAFKA_PREFIX))):
            continue
        try:
            read[inline] = read_secret_file(name, str(path).strip())
        except ConfigError:
            continue  # settings refuse it (exit 2); nothing of it can be quoted
    return {**env, **read}


def secret_values(settings: Settings) -> list[str]:
    """Every secret the tier was given, longest first."""
    given = {name: (getattr(settings, attr) if attr else os.environ.get(name))
             for name, (_, attr) in SECRET_SETTINGS.items()}
    return _collect(given, settings.producer_config)


def _collect(given: Mapping[str, str | None], kafka: Mapping[str, str]) -> list[str]:
    import psycopg

    found: set[str] = set()
    for name, (kind, _) in SECRET_SETTINGS.items():
        value = given.get(name) or ""
        if kind == "password" and value:
            try:
                value = str(psycopg.conninfo.conninfo_to_dict(value).get("password") or "")
            except psycopg.ProgrammingError:
                value = ""  # unparsable: the connection-string patterns of Redactor still apply
        found.add(value)
    found.update(str(v) for k, v in kafka.items() if is_secret_property(k))
    for value in list(found):
        found.add(value.strip())
        # An inline PEM key is quoted line by line as often as whole: its body lines too.
        found.update(line.strip() for line in value.splitlines() if not line.strip().startswith("-----"))
    # A URI may carry a value percent-encoded; messages may quote either spelling.
    found.update([urllib.parse.quote(value, safe="") for value in found])
    return sorted((v for v in found if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str, settings: Settings) -> str:
    """`text` with every secret of `settings` replaced by ***."""
    return Redactor(secret_values(settings)).text(text)


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()):
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, HIDDEN)
        value = _URI_PASSWORD.sub(lambda m: f"{m['scheme']}:{HIDDEN}@", value)
        return _KV_PASSWORD.sub(lambda m: f"{m['key']}{m['quote']}{HIDDEN}", value)

    def value(self, value: object) -> object:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.text(str(value))
