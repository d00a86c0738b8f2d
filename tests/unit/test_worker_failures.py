"""FailureStreak without services: the streak of non-transient failures to exit 3, the transient
back-off, the errorId a retry and a recovery repeat, and a pool timeout that asks the server why."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import psycopg_pool
import pytest

from kaireon_pub.errors import ExitCode, SystemicError, TransientError
from kaireon_pub.worker.failures import FailureStreak, database_refusal, is_transient


async def accepts() -> None:
    return None


def streak(max_failures: int = 3, poll_s: float = 0.1, probe=accepts) -> FailureStreak:
    return FailureStreak(max_failures, poll_s, probe)


def events(caplog, name: str) -> list:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def test_streak_of_non_transient_failures_exits_3_and_transient_ones_back_off(caplog):
    caplog.set_level(logging.INFO, "kaireon_pub.worker")
    f = streak()
    for _ in range(4):
        assert asyncio.run(f.failed(TransientError("blip"))) is None
    assert f.streak == 0 and f.backoff() == pytest.approx(1.6)
    assert asyncio.run(f.failed(SystemicError("no topic"))) is None
    assert asyncio.run(f.failed(psycopg.errors.UndefinedTable("x"))) is None
    error_id = f.last_error_id
    assert asyncio.run(f.failed(RuntimeError("bug"))) == ExitCode.NON_TRANSIENT == 3
    failed = events(caplog, "tick failed")
    assert [r.consecutiveFailures for r in failed] == [0, 0, 0, 0, 1, 2, 3]
    assert [r.isTransient for r in failed] == [True] * 4 + [False] * 3
    assert failed[5].hint.startswith("the schema is missing")
    assert failed[6].exc_info is not None and failed[5].exc_info is None  # a traceback for a bug only
    assert caplog.records[-1].event == "giving up" and f.last_error_id not in (None, error_id)
    assert caplog.records[-1].errorId == f.last_error_id
    f.succeeded()
    assert (f.streak, f.streak_transient, f.last_error_id) == (0, 0, None)
    assert caplog.records[-1].event == "tick recovered" and caplog.records[-1].errorId == failed[-1].errorId
    assert f.backoff() == pytest.approx(0.1)


def test_the_retry_line_repeats_the_failures_errorid_and_the_backoff_caps_at_30s(caplog):
    caplog.set_level(logging.INFO, "kaireon_pub.worker")
    f = streak(poll_s=2.0)
    for _ in range(6):
        asyncio.run(f.failed(TransientError("blip")))
    assert f.backoff() == 30.0
    retry = events(caplog, "tick retry")[-1]
    assert retry.errorId == events(caplog, "tick failed")[-1].errorId and retry.delaySeconds == 30.0


def test_a_transient_failure_does_not_reset_the_non_transient_streak():
    f = streak(max_failures=2)
    assert asyncio.run(f.failed(SystemicError("x"))) is None
    assert asyncio.run(f.failed(TransientError("blip"))) is None
    assert asyncio.run(f.failed(SystemicError("x"))) == 3


def test_a_pool_timeout_is_reported_with_the_servers_reason():
    refusal = psycopg.OperationalError('password authentication failed for user "x"')

    async def refuses():
        return refusal

    f = streak(max_failures=1, probe=refuses)
    assert asyncio.run(f.failed(psycopg_pool.PoolTimeout("no connection"))) == 3  # the server's reason is fatal
    assert f.probe_database_first
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(f.probe_database())
    assert f.probe_database_first


def test_a_pool_timeout_the_server_cannot_explain_stays_transient():
    f = streak(max_failures=1)
    assert asyncio.run(f.failed(psycopg_pool.PoolTimeout("no connection"))) is None
    asyncio.run(f.probe_database())
    assert not f.probe_database_first


def test_is_transient():
    assert is_transient(TransientError("x")) and not is_transient(SystemicError("x"))
    assert is_transient(psycopg.errors.LockNotAvailable("x")) and not is_transient(ValueError("x"))


def test_database_refusal_closes_a_connection_it_got():
    class Conn:
        closed = False

        async def close(self):
            self.closed = True

    conn = Conn()

    async def connect():
        return conn

    async def refuse():
        raise psycopg.OperationalError("no")

    assert asyncio.run(database_refusal(connect)) is None and conn.closed
    assert isinstance(asyncio.run(database_refusal(refuse)), psycopg.OperationalError)
