"""OUTBOX_CLOUDEVENTS and OUTBOX_CLOUDEVENTS_SOURCE: off by default, a source required when on."""

import pytest

from kaireon_pub.errors import ConfigError
from kaireon_pub.settings import Settings

BASE = {"DATABASE_URL": "postgresql:///x", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"}


def test_off_by_default():
    settings = Settings.from_env(BASE)
    assert settings.cloudevents is False and settings.cloudevents_source == ""


def test_on_with_a_source():
    settings = Settings.from_env({**BASE, "OUTBOX_CLOUDEVENTS": "true",
                                  "OUTBOX_CLOUDEVENTS_SOURCE": " /orders-service "})
    assert settings.cloudevents is True and settings.cloudevents_source == "/orders-service"


@pytest.mark.parametrize("source", [None, "", "   "])
def test_on_without_a_source_is_a_config_error(source):
    env = {**BASE, "OUTBOX_CLOUDEVENTS": "true"}
    if source is not None:
        env["OUTBOX_CLOUDEVENTS_SOURCE"] = source
    with pytest.raises(ConfigError, match=r"^OUTBOX_CLOUDEVENTS_SOURCE: is not set while OUTBOX_CLOUDEVENTS is true"):
        Settings.from_env(env)


@pytest.mark.parametrize("source", ["/orders service", "/orders\tx", "/caf\u00e9"])
def test_a_source_that_is_not_a_uri_reference_is_a_config_error(source):
    with pytest.raises(ConfigError, match="OUTBOX_CLOUDEVENTS_SOURCE: .* is not a URI-reference"):
        Settings.from_env({**BASE, "OUTBOX_CLOUDEVENTS": "true", "OUTBOX_CLOUDEVENTS_SOURCE": source})


def test_not_a_boolean_is_a_config_error():
    with pytest.raises(ConfigError, match="^OUTBOX_CLOUDEVENTS: 'maybe' is not a boolean"):
        Settings.from_env({**BASE, "OUTBOX_CLOUDEVENTS": "maybe", "OUTBOX_CLOUDEVENTS_SOURCE": "/x"})
