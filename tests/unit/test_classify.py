"""Which database failures are transient (retry) and which need an operator (the exit-3 streak)."""

import psycopg
import psycopg_pool
import pytest

from kaireon_pub.worker.loop import classify_db_error


@pytest.mark.parametrize(("message", "transient"), [
    ("connection failed: connection refused", True),
    ("server closed the connection unexpectedly", True),
    ('FATAL:  password authentication failed for user "app"', False),
    ('FATAL:  role "nobody" does not exist', False),
    ('FATAL:  database "gone" does not exist', False),
    ("FATAL:  no pg_hba.conf entry for host", False),
    # PgBouncer in transaction mode, reached by a tier still in OUTBOX_POOL_MODE=session.
    ("FATAL:  unsupported startup parameter: options", False),
])
def test_operational_errors(message, transient):
    assert classify_db_error(psycopg.OperationalError(message)) is transient


def test_a_pool_timeout_alone_is_transient_until_the_server_says_why():
    assert classify_db_error(psycopg_pool.PoolTimeout("couldn't get a connection")) is True


def test_a_missing_table_needs_an_operator():
    assert classify_db_error(psycopg.errors.UndefinedTable("relation does not exist")) is False
