"""Secrets from files (issue 26): DATABASE_URL_FILE, CRON_SECRET_FILE, KAFKA_<secret property>_FILE.

Read at start, one of NAME and NAME_FILE (both: a ConfigError naming them), and every value read
from a file is in the one redaction's list (a sentinel test). CRON_SECRET_FILE's re-reading on
rotation is tests/unit/test_cron_auth.py's; the whole tier's is tests/e2e/test_secret_files.py's.
"""

from __future__ import annotations

import pytest

from kaireon_pub.errors import ConfigError
from kaireon_pub.redact import Redactor, redact, redacted_producer_config, secret_values, secrets_of
from kaireon_pub.settings import Settings

DB_PASSWORD = "SntlDbFilePw7q"
CRON = "SntlCronFileSecret7q"
PREVIOUS = "SntlCronPreviousSecret7q"
SASL = "SntlSaslFilePw7q"
SENTINELS = (DB_PASSWORD, CRON, PREVIOUS, SASL)


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """An environment whose every secret is a file (with the trailing newline `kubectl create secret` leaves)."""
    values = {"DATABASE_URL_FILE": f"postgresql://app:{DB_PASSWORD}@db.example:5432/app",
              "CRON_SECRET_FILE": CRON, "CRON_SECRET_PREVIOUS_FILE": PREVIOUS, "KAFKA_SASL_PASSWORD_FILE": SASL}
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "KAFKA_SASL_USERNAME": "svc"}
    for name, value in values.items():
        path = tmp_path / name.lower()
        path.write_text(value + "\n")
        env[name] = str(path)
    return env


def test_every_secret_is_read_from_its_file(files):
    s = Settings.from_env(files)
    assert s.database_url == f"postgresql://app:{DB_PASSWORD}@db.example:5432/app"
    assert (s.cron_secret, s.cron_secret_previous) == (CRON, PREVIOUS)
    assert (s.cron_secret_file, s.cron_secret_previous_file) == (files["CRON_SECRET_FILE"],
                                                                 files["CRON_SECRET_PREVIOUS_FILE"])
    assert s.producer_config["sasl.password"] == SASL
    assert not any(key.endswith(".file") for key in s.producer_config)  # never a librdkafka property


@pytest.mark.parametrize("name", ["DATABASE_URL", "CRON_SECRET", "CRON_SECRET_PREVIOUS", "KAFKA_SASL_PASSWORD"])
def test_a_value_given_both_ways_is_a_config_error_naming_both(files, name):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**files, name: "inline-value-of-16-bytes"})
    assert info.value.variable == name + "_FILE" and name in info.value.problem
    assert not any(s in str(info.value) for s in SENTINELS)


def test_an_unreadable_file_is_a_config_error_naming_its_variable(files, tmp_path):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**files, "DATABASE_URL_FILE": str(tmp_path / "missing")})
    assert info.value.variable == "DATABASE_URL_FILE" and "No such file" in info.value.problem


def test_a_short_cron_secret_in_a_file_is_a_config_error_naming_the_file_variable(files, tmp_path):
    (tmp_path / "short").write_text("tiny-Secret\n")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**files, "CRON_SECRET_FILE": str(tmp_path / "short")})
    assert info.value.variable == "CRON_SECRET_FILE" and "16 bytes" in str(info.value)
    assert "tiny-Secret" not in str(info.value)


@pytest.mark.parametrize(("name", "problem"), [("KAFKA_LINGER_MS_FILE", "not a secret property"),
                                               ("KAFKA_SSL_KEY_PASSWORD_FILE", None)])
def test_a_kafka_file_is_for_a_secret_property_only(files, tmp_path, name, problem):
    (tmp_path / "value").write_text("SntlOtherFileValue7q\n")
    env = {**files, name: str(tmp_path / "value")}
    if problem is None:
        assert Settings.from_env(env).producer_config["ssl.key.password"] == "SntlOtherFileValue7q"
        return
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.variable == name and problem in info.value.problem


def test_values_read_from_files_are_in_the_one_redaction(files):
    s = Settings.from_env(files)
    text = " | ".join([*SENTINELS, s.database_url, repr(dict(s.producer_config))])
    for hidden in (redact(text, s), Redactor(secrets_of(files)).text(text)):
        assert not [x for x in SENTINELS if x in hidden], hidden
    listed = set(secret_values(s))
    assert set(SENTINELS) <= listed and set(SENTINELS) <= set(secrets_of(files))
    assert redacted_producer_config(s.producer_config)["sasl.password"] == "***"
    assert not any(x in repr(s) for x in SENTINELS)
