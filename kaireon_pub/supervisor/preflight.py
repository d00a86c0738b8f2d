"""Checks that must pass before the supervisor forks anything.

The librdkafka configuration can only be checked by librdkafka, and a producer owns threads,
which must never exist in the supervisor (fork() would copy them half-alive). So a short-lived
child builds one producer from the settings and reports the first invalid property through a
pipe; the supervisor stays thread-free and exits 2 before any worker or HTTP process exists.
"""

from __future__ import annotations

import os

import orjson

from kaireon_pub.errors import ConfigError
from kaireon_pub.settings import Settings


def check_producer_config(settings: Settings) -> ConfigError | None:
    """None when librdkafka accepts the producer configuration, else the problem."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the probe: build a producer, report, exit at once
        os.close(read_fd)
        code = 0
        try:
            from kaireon_pub.worker.kafka.producer import make_producer

            make_producer(settings, "kaireon-pub-config-check")
        except ConfigError as exc:
            os.write(write_fd, orjson.dumps([exc.variable, exc.problem, exc.accepted]))
            code = 2
        except BaseException as exc:  # noqa: BLE001 - whatever librdkafka refuses is reported
            os.write(write_fd, orjson.dumps(["KAFKA_*", f"{type(exc).__name__}: {exc}",
                                             "a configuration librdkafka accepts"]))
            code = 2
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if chunks:
        variable, problem, accepted = orjson.loads(b"".join(chunks))
        return ConfigError(variable, problem, accepted)
    if os.waitstatus_to_exitcode(status) != 0:
        return ConfigError("KAFKA_*", f"the configuration check exited with status {status}",
                           "a configuration librdkafka accepts")
    return None
