"""Settings: defaults, ranges, cross-field rules, the staleness fallback, the KAFKA_ pass-through."""

import pytest

from kaireon_pub.errors import ConfigError
from kaireon_pub.redact import redacted_producer_config
from kaireon_pub.settings import SETTINGS, Settings

BASE = {"DATABASE_URL": "postgresql://u:secret@db/x", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"}


def parse(**env: str) -> Settings:
    return Settings.from_env({**BASE, **env})


def test_defaults_match_the_spec():
    s = parse()
    assert s.poll_interval_ms == 2000
    assert s.shutdown_drain_timeout_ms == 15000
    assert s.liveness_file == "/tmp/outbox-publisher.alive"
    assert s.reaper_staleness_seconds == 300
    assert s.max_consecutive_failures == 30
    assert s.producer_config["enable.idempotence"] == "true"
    assert s.producer_config["acks"] == "all"
    assert s.producer_config["message.timeout.ms"] == "10000"


def test_registry_defaults_parse_to_the_dataclass_defaults():
    s = parse()
    for setting in SETTINGS:
        if setting.env == "OUTBOX_POLL_INTERVAL_MS":
            assert str(s.poll_interval_ms) == setting.default
        if setting.env == "OUTBOX_BATCH_SIZE":
            assert str(s.batch_size) == setting.default


def test_kafka_prefix_passes_through_and_secrets_are_redacted():
    s = parse(KAFKA_SASL_USERNAME="svc", KAFKA_SASL_PASSWORD="hunter2", KAFKA_LINGER_MS="20")
    assert s.producer_config["sasl.username"] == "svc"
    assert s.producer_config["linger.ms"] == "20"
    assert "hunter2" not in repr(s)
    assert redacted_producer_config(s.producer_config)["sasl.password"] == "***"


@pytest.mark.parametrize("value", ["abc", "0", "-5", "", "  "])
def test_invalid_staleness_falls_back_with_a_warning(value):
    s = parse(OUTBOX_REAPER_STALENESS_SECONDS=value)
    assert s.reaper_staleness_seconds == 300
    assert any("OUTBOX_REAPER_STALENESS_SECONDS" in w for w in s.warnings)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OUTBOX_POLL_INTERVAL_MS": "0"}, "OUTBOX_POLL_INTERVAL_MS"),
        ({"OUTBOX_POLL_INTERVAL_MS": "-1"}, "OUTBOX_POLL_INTERVAL_MS"),
        ({"OUTBOX_POLL_INTERVAL_MS": "fast"}, "OUTBOX_POLL_INTERVAL_MS"),
        ({"OUTBOX_POLL_INTERVAL_MS": "999999999"}, "OUTBOX_POLL_INTERVAL_MS"),
        ({"OUTBOX_BATCH_SIZE": "0"}, "OUTBOX_BATCH_SIZE"),
        ({"OUTBOX_WORKERS": "65"}, "OUTBOX_WORKERS"),
        ({"OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS": "1.5"}, "OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS"),
        ({"OUTBOX_MAX_ATTEMPTS": "-3"}, "OUTBOX_MAX_ATTEMPTS"),
        ({"OUTBOX_ORDERING": "whatever"}, "OUTBOX_ORDERING"),
        ({"OUTBOX_DELETE_ON_PUBLISH": "maybe"}, "OUTBOX_DELETE_ON_PUBLISH"),
        ({"OUTBOX_HTTP_PORT": "70000"}, "OUTBOX_HTTP_PORT"),
        ({"OUTBOX_LOG_LEVEL": "LOUD"}, "OUTBOX_LOG_LEVEL"),
        ({"OUTBOX_BACKOFF_BASE_MS": "5000", "OUTBOX_BACKOFF_MAX_MS": "1000"}, "OUTBOX_BACKOFF_MAX_MS"),
        ({"OUTBOX_REAPER_STALENESS_SECONDS": "20"}, "OUTBOX_REAPER_STALENESS_SECONDS"),
        ({"KAFKA_MESSAGE_TIMEOUT_MS": "290000"}, "OUTBOX_REAPER_STALENESS_SECONDS"),
        ({"OUTBOX_WORKER_TIMEOUT_SECONDS": "5"}, "OUTBOX_WORKER_TIMEOUT_SECONDS"),
        ({"KAFKA_ACKS": "1"}, "KAFKA_ACKS"),
        ({"KAFKA_ENABLE_IDEMPOTENCE": "false"}, "KAFKA_ENABLE_IDEMPOTENCE"),
        ({"KAFKA_MESSAGE_TIMEOUT_MS": "soon"}, "KAFKA_MESSAGE_TIMEOUT_MS"),
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
    ],
)
def test_invalid_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError) as info:
        parse(**env)
    assert info.value.variable == variable
    assert variable in str(info.value) and "accepted" in str(info.value)


def test_secret_never_in_config_error():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"DATABASE_URL": "postgresql://u:s3ntinel@db/x", "KAFKA_BOOTSTRAP_SERVERS": "x:1",
                           "OUTBOX_BATCH_SIZE": "0"})
    assert "s3ntinel" not in str(info.value)


def test_readme_documents_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [s.env for s in SETTINGS if f"| `{s.env}` |" not in readme]
    assert missing == []


# ---- the cron secret (issue 26) -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["tiny-Secret", "x" * 15, "é" * 7 + "x", "fifteen-bytes!!\n"])
def test_a_cron_secret_shorter_than_16_bytes_is_a_config_error_naming_it(value):
    with pytest.raises(ConfigError) as info:
        parse(CRON_SECRET=value)
    assert info.value.variable == "CRON_SECRET"
    assert "16 bytes" in str(info.value) and value.strip() not in str(info.value)


@pytest.mark.parametrize("value", ["x" * 16, "é" * 8, "0123456789abcdef\n", "", "  ", "None", "null"])
def test_16_bytes_or_no_secret_at_all_is_accepted(value):
    assert parse(CRON_SECRET=value).cron_secret == value


def test_the_previous_secret_its_length_its_partner_and_its_expiry():
    s = parse(CRON_SECRET="n" * 16, CRON_SECRET_PREVIOUS="o" * 16,
              CRON_SECRET_PREVIOUS_EXPIRES_AT="2026-05-01T12:00:00Z")
    assert (s.cron_secret_previous, s.cron_secret_previous_expires_at) == ("o" * 16, 1777636800.0)
    assert parse(CRON_SECRET="n" * 16, CRON_SECRET_PREVIOUS_EXPIRES_AT="2026-05-01T14:00:00+02:00"
                 ).cron_secret_previous_expires_at == 1777636800.0
    assert "o" * 16 not in repr(s)
    for env, variable in [({"CRON_SECRET": "n" * 16, "CRON_SECRET_PREVIOUS": "old"}, "CRON_SECRET_PREVIOUS"),
                          ({"CRON_SECRET_PREVIOUS": "o" * 16}, "CRON_SECRET_PREVIOUS"),
                          ({"CRON_SECRET": "n" * 16, "CRON_SECRET_PREVIOUS_EXPIRES_AT": "tomorrow"},
                           "CRON_SECRET_PREVIOUS_EXPIRES_AT"),
                          ({"CRON_SECRET": "n" * 16, "CRON_SECRET_PREVIOUS_EXPIRES_AT": "2026-05-01T12:00:00"},
                           "CRON_SECRET_PREVIOUS_EXPIRES_AT")]:
        with pytest.raises(ConfigError) as info:
            parse(**env)
        assert info.value.variable == variable, env
