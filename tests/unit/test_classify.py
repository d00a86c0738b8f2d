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
    # PgBouncer with auth_type=trust, for a user that is not in its auth_file.
    ('FATAL:  "trust" authentication failed', False),
])
def test_operational_errors(message, transient):
    assert classify_db_error(psycopg.OperationalError(message)) is transient


def test_a_pool_timeout_alone_is_transient_until_the_server_says_why():
    assert classify_db_error(psycopg_pool.PoolTimeout("couldn't get a connection")) is True


def test_a_missing_table_needs_an_operator():
    assert classify_db_error(psycopg.errors.UndefinedTable("relation does not exist")) is False


def test_kafka_errors_by_whose_fault_they_are():
    from confluent_kafka import KafkaError

    from kaireon_pub.worker.kafka.errors import classify

    assert classify(KafkaError(KafkaError.PRODUCER_FENCED)) == "producer"
    assert classify(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER)) == "producer"
    assert classify(KafkaError(KafkaError.UNKNOWN_PRODUCER_ID)) == "producer"
    assert classify(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)) == "permanent"
    # A missing topic holds its own events (retry), not the tier (systemic, exit 3).
    assert classify(KafkaError(KafkaError._UNKNOWN_TOPIC)) == "retry"
    assert classify(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)) == "retry"
    assert classify(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)) == "systemic"
    assert classify(KafkaError(KafkaError._MSG_TIMED_OUT)) == "transient"
