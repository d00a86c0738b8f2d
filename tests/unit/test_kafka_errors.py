"""Whose fault a Kafka error is (worker/kafka/errors.py), every table and the fall-backs."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from kaireon_pub.worker.kafka import errors
from kaireon_pub.worker.kafka.errors import classify, describe

TABLES = {
    "producer": errors.PRODUCER_LEVEL,
    "permanent": errors.PER_EVENT_PERMANENT,
    "retry": errors.PER_EVENT_RETRY,
    "systemic": errors.SYSTEMIC,
    "transient": errors.TRANSIENT,
    "released": errors.RELEASED,
}


def test_no_code_is_in_two_tables():
    seen: dict[int, str] = {}
    for kind, codes in TABLES.items():
        for code in codes:
            assert code not in seen, f"{KafkaError(code).name()} is both {seen[code]} and {kind}"
            seen[code] = kind


@pytest.mark.parametrize(("kind", "code"), [(kind, code) for kind, codes in TABLES.items() for code in sorted(codes)])
def test_every_code_of_a_table_is_of_its_kind(kind, code):
    assert classify(KafkaError(code)) == kind


def test_a_fatal_error_is_the_producers_whatever_its_code():
    assert classify(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "x", fatal=True)) == "producer"
    assert classify(KafkaError(KafkaError.UNKNOWN, "x", fatal=True)) == "producer"


def test_an_unknown_code_is_transient_when_the_client_says_retriable_else_retried_with_back_off():
    assert classify(KafkaError(KafkaError.UNKNOWN, retriable=True)) == "transient"
    assert classify(KafkaError(KafkaError.UNKNOWN)) == "retry"
    assert classify(KafkaError(KafkaError.RECORD_LIST_TOO_LARGE, retriable=True)) == "permanent"  # the table first


def test_a_missing_topic_holds_its_own_events_not_the_tier():
    assert classify(KafkaError(KafkaError._UNKNOWN_TOPIC)) == "retry"
    assert classify(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)) == "retry"
    assert classify(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)) == "systemic"


def test_describe_names_the_code_and_says_why():
    assert describe(KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out")) == \
        "_MSG_TIMED_OUT: Local: Message timed out"


def test_a_refusal_of_the_whole_record_batch_is_permanent_for_a_record_alone():
    # delivery.py judges the report by the record's wave: alone, rejected; shared, a suspect.
    assert errors.BATCH_REFUSALS <= errors.PER_EVENT_PERMANENT
    assert errors.BATCH_REFUSALS == {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE}


def test_a_record_failed_for_another_invalid_record_of_its_batch_is_released():
    assert classify(KafkaError(KafkaError._INVALID_DIFFERENT_RECORD)) == "released"
    assert classify(KafkaError(KafkaError.INVALID_RECORD)) == "permanent"  # the one librdkafka names
