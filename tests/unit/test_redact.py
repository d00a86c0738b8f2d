"""The one redaction (kaireon_pub.redact): a sentinel in each secret setting and each secret librdkafka
property never reaches redacted output: a log line, `redact()` (reap, status, the HTTP child), the
producer configuration of "supervisor started", or `secrets_of` (check and the CLI before settings)."""

from __future__ import annotations

import logging
import sys
import urllib.parse

import orjson
import pytest

from kaireon_pub import logs
from kaireon_pub.redact import (
    SECRET_SETTINGS,
    Redactor,
    is_secret_property,
    redact,
    redacted_producer_config,
    secret_values,
    secrets_of,
)
from kaireon_pub.settings import Settings, kafka_env_name

# From librdkafka's CONFIGURATION.md: every property whose value is a secret or holds one.
SECRET_PROPERTIES = (
    "sasl.password",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
)
# Public: names, paths, certificates (a certificate is public; its private key is not).
PUBLIC_PROPERTIES = (
    "bootstrap.servers", "sasl.username", "sasl.mechanism", "security.protocol", "ssl.key.location",
    "ssl.certificate.pem", "ssl.certificate.location", "ssl.ca.pem", "https.ca.pem", "ssl.keystore.location",
    "sasl.oauthbearer.client.id", "sasl.oauthbearer.token.endpoint.url", "sasl.oauthbearer.scope",
    "sasl.oauthbearer.assertion.private.key.file", "linger.ms", "message.timeout.ms",
)


def sentinel(label: str) -> str:
    return f"Sntl{label.replace('.', '').replace('_', '')[:20]}Xq9"


def pem(label: str) -> str:
    body = sentinel(label)
    return f"-----BEGIN PRIVATE KEY-----\nMIIEv{body}AAA\nQQ{body}BB==\n-----END PRIVATE KEY-----\n"


def secret_env() -> dict[str, str]:
    """An environment with a sentinel in every secret setting and every secret KAFKA_* property."""
    env = {
        "DATABASE_URL": f"postgresql://app:{sentinel('db')}@127.0.0.1:5432/app",
        "OUTBOX_LISTEN_DATABASE_URL": f"host=127.0.0.1 port=5432 user=app password={sentinel('listen')} dbname=app",
        "CRON_SECRET": sentinel("cron") + "-long-enough\n",
        "PGPASSWORD": sentinel("pgpassword"),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
        "KAFKA_SASL_USERNAME": "svc-user",
    }
    for prop in SECRET_PROPERTIES:
        env[kafka_env_name(prop)] = pem(prop) if prop.endswith(".pem") else sentinel(prop)
    return env


def sentinels() -> list[str]:
    return [sentinel(name) for name in ("db", "listen", "cron", "pgpassword", *SECRET_PROPERTIES)]


def leaks(text: str) -> list[str]:
    return [s for s in sentinels() if s in text]


def quoting_everything(env: dict[str, str]) -> str:
    """A text that quotes every value of the environment the ways messages do."""
    parts = []
    for name, value in env.items():
        parts += [f"{name}={value}", repr(value), urllib.parse.quote(value, safe="")]
        parts += value.splitlines()
    return " | ".join(parts)


def test_the_one_list_names_the_database_passwords_pgpassword_and_the_cron_secret():
    assert set(SECRET_SETTINGS) == {"DATABASE_URL", "OUTBOX_LISTEN_DATABASE_URL", "CRON_SECRET", "CRON_SECRET_PREVIOUS",
                                    "PGPASSWORD"}


@pytest.mark.parametrize("prop", SECRET_PROPERTIES)
def test_every_secret_librdkafka_property_is_secret(prop):
    assert is_secret_property(prop)


@pytest.mark.parametrize("prop", PUBLIC_PROPERTIES)
def test_public_librdkafka_properties_are_shown(prop):
    assert not is_secret_property(prop)


def test_the_test_texts_do_carry_every_sentinel():
    # The control: without redaction every sentinel is there, so the tests below can fail.
    assert leaks(quoting_everything(secret_env())) == sentinels()


def test_secrets_of_an_environment_hide_every_secret():
    env = secret_env()
    assert leaks(Redactor(secrets_of(env)).text(quoting_everything(env))) == []


def test_secret_values_of_settings_hide_every_secret(monkeypatch):
    env = secret_env()
    monkeypatch.setenv("PGPASSWORD", env["PGPASSWORD"])
    settings = Settings.from_env(env)
    text = quoting_everything(env)
    assert leaks(Redactor(secret_values(settings)).text(text)) == []
    assert leaks(redact(text, settings)) == []  # reap, status, requeue, migrate, the HTTP child


def test_the_producer_configuration_of_supervisor_started_shows_no_secret():
    settings = Settings.from_env(secret_env())
    shown = redacted_producer_config(settings.producer_config)
    assert leaks(orjson.dumps(shown).decode()) == []
    assert shown["sasl.username"] == "svc-user" and shown["sasl.password"] == "***"
    assert set(SECRET_PROPERTIES) <= set(shown)


def test_a_kubernetes_service_link_is_not_taken_for_a_property():
    assert secrets_of({"KAFKA_PORT": "tcp://10.0.0.7:9092"}) == []


def test_a_log_line_shows_no_secret(monkeypatch):
    env = secret_env()
    monkeypatch.setenv("PGPASSWORD", env["PGPASSWORD"])
    formatter = logs.JsonFormatter(Redactor(secret_values(Settings.from_env(env))))
    text = quoting_everything(env)
    try:
        raise RuntimeError(text)
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("psycopg.pool", logging.WARNING, __file__, 1, "failed: %s", (text,), exc_info)
    record.error = text
    record.fields = {"nested": [text]}
    line = formatter.format(record)
    assert leaks(line) == []
    assert orjson.loads(line)["event"] == "library log"


def test_a_connection_string_quoted_back_is_hidden_without_settings():
    text = Redactor().text("connection to postgresql://app:Sntlother9@db:5432/app failed; password=Sntlkv9 x")
    assert "Sntlother9" not in text and "Sntlkv9" not in text


def test_short_values_do_not_blank_out_ordinary_text():
    assert Redactor(["ab"]).text("ab cd") == "ab cd"
