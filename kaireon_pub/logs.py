"""One JSON object per line on stderr, for every process of the tier.

Fields: ts, level, logger, msg, pid, role (supervisor | worker-N | cli), plus whatever a call
passes in `extra` (errorId, isTransient, eventIds, ...). librdkafka's own log lines are routed
through the `kaireon_pub.librdkafka` logger by giving the Producer a `logger`.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_role = "cli"


def set_role(role: str) -> None:
    global _role
    _role = role


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": os.getpid(),
            "role": _role,
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # psycopg's pool logs every reconnect attempt at INFO; its failures reach us as exceptions.
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)


def librdkafka_logger() -> logging.Logger:
    return logging.getLogger("kaireon_pub.librdkafka")
