"""Making the librdkafka producer from the settings (no metrics, no threads of our own: the
supervisor's configuration probe uses it in a child before any worker exists)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from kaireon_pub.errors import ConfigError
from kaireon_pub.logs import librdkafka_logger
from kaireon_pub.settings import Settings, kafka_env_name


def make_producer(settings: Settings, client_id: str,
                  on_error: Callable[[KafkaError], None] | None = None) -> Producer:
    """A producer from the settings; an invalid librdkafka property raises ConfigError naming its
    KAFKA_ variable."""
    config: dict[str, Any] = dict(settings.producer_config)
    config.setdefault("client.id", client_id)
    if on_error is not None:
        config["error_cb"] = on_error
    config["logger"] = librdkafka_logger()
    try:
        return Producer(config)
    except KafkaException as exc:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        match = re.search(r'property: "([a-z0-9._]+)"', str(exc)) or re.search(r'"([a-z0-9._]+)"', str(exc))
        if err is not None and err.code() == KafkaError._INVALID_ARG and match:
            raise ConfigError(kafka_env_name(match.group(1)), err.str(),
                              "a librdkafka producer property and value") from None
        raise
