"""One JSON object per line on stderr, for every process of the tier and every library in it.

Fields: ts, level, logger, msg, pid, role (supervisor | worker-N | http | cli), event, plus
whatever a call passes in `extra` (errorId, isTransient, eventIds, ...). librdkafka's own log
lines are routed through the `kaireon_pub.librdkafka` logger by giving the Producer a `logger`;
psycopg's, psycopg_pool's and waitress's loggers reach the same root handler.

Every line is scrubbed before it is written, by the one redaction of `kaireon_pub.redact`: the
configured secrets (the database passwords, PGPASSWORD, CRON_SECRET, librdkafka's secret
properties) and anything shaped like a credential in a connection string (`user:password@`,
`password=…`) become `***`, whichever logger wrote it. Lines of other libraries
get an `event` (`library log`) and, from WARNING up, an `errorId`, like the tier's own.
"""

from __future__ import annotations

import logging
import os
import secrets as _secrets
import sys
import time
from collections.abc import Iterable

import orjson

from kaireon_pub.redact import Redactor

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_OWN_LOGGERS = "kaireon_pub"
_role = "cli"


def set_role(role: str) -> None:
    global _role
    _role = role


class JsonFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor | None = None):
        super().__init__()
        self.redactor = redactor or Redactor()

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
        if not record.name.startswith(_OWN_LOGGERS):
            entry.setdefault("event", "library log")
            if record.levelno >= logging.WARNING:
                entry.setdefault("errorId", _secrets.token_hex(8))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(self.redactor.value(entry), default=str).decode()


def configure(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(Redactor(secrets)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # psycopg's pool logs every reconnect attempt at INFO; its failures reach us as exceptions.
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)


def librdkafka_logger() -> logging.Logger:
    return logging.getLogger("kaireon_pub.librdkafka")
