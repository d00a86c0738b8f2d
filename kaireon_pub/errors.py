"""Error kinds and the documented exit codes.

Three kinds of failure drive what the tier does next:
- per-event permanent (`EventRejected`): the event goes `failed`, the others flow, no streak;
- transient (`TransientError`): back off and retry, no streak;
- systemic non-transient (`SystemicError`): counts towards the exit-3 streak.
"""

from __future__ import annotations

import secrets


class ExitCode:
    OK = 0
    CRASH = 1  # an unexpected error; the traceback is logged
    CONFIG = 2  # bad environment configuration
    NON_TRANSIENT = 3  # OUTBOX_MAX_CONSECUTIVE_FAILURES non-transient tick failures in a row
    WORKER_BOOT = 4  # workers failed to boot again and again
    # The database schema is missing or older than this version's migrations; the message says
    # to run `kaireon-pub migrate` (every command that needs the schema, and `migrate --check`).
    SCHEMA_MISSING = 5


class ConfigError(Exception):
    """A setting is invalid. The message names the variable, the problem and the accepted range."""

    def __init__(self, variable: str, problem: str, accepted: str):
        self.variable = variable
        self.problem = problem
        self.accepted = accepted
        super().__init__(f"{variable}: {problem} (accepted: {accepted})")


class PayloadError(ValueError):
    """enqueue() refused an event before writing anything."""


class TransientError(Exception):
    """The broker or the database is unreachable or timed out; retry after a back-off."""


class SystemicError(Exception):
    """A non-transient failure of the whole tick (missing table, unknown topic, bad credentials)."""


def new_error_id() -> str:
    """A short id that ties a failure's log line to its retry line (SIEM correlation)."""
    return secrets.token_hex(8)
