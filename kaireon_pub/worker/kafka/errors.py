"""Whose fault a Kafka error is: the error tables and classify().

The broker judges a record batch, not a record: a batch larger than its topic's max.message.bytes
(or than a log segment) is refused whole, and librdkafka reports MSG_SIZE_TOO_LARGE (or
RECORD_LIST_TOO_LARGE) for every record in it, the small ones that only shared it too. Such a report
is the record's own fault only when the record was alone in its batch (BATCH_REFUSALS: delivery.py
and publisher.py judge it). An invalid record is named by the broker (INVALID_RECORD, per record);
librdkafka reports the others of its batch with _INVALID_DIFFERENT_RECORD (RELEASED).

Producer-level failures are not the events' fault: a fenced producer, an out-of-order sequence or
unknown producer id (a broker that lost its idempotence state), any fatal error. The batch is
released and the producer recreated (producer.py).
"""

from __future__ import annotations

from confluent_kafka import KafkaError

# Errors that are the event's own fault: publishing it again cannot succeed.
PER_EVENT_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.INVALID_RECORD,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.POLICY_VIOLATION,
    KafkaError._INVALID_ARG,
    KafkaError.TOPIC_EXCEPTION,  # an invalid topic name: the event's own fault
}
# Refusals of a whole record batch: permanent for a record alone in its batch; one that shared it is
# only a suspect (released, then produced alone).
BATCH_REFUSALS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
# Not the event's fault, nor anyone's to retry: another record of its batch was the cause (released,
# attempts untouched).
RELEASED = {
    KafkaError._INVALID_DIFFERENT_RECORD,
}
# Errors of the whole tier's setup: retrying changes nothing until an operator acts.
SYSTEMIC = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._AUTHENTICATION,
    KafkaError._SSL,
}
# A topic that does not exist (and that the broker does not create) is not for the whole tier to
# stop on: other topics publish, the events of that topic retry with back-off, holding their keys
# only, and become failed after OUTBOX_MAX_ATTEMPTS (requeue them once the topic exists).
PER_EVENT_RETRY = {
    KafkaError._UNKNOWN_TOPIC,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
}
# The producer's own state is wrong (its epoch, its sequence numbers, its id): only a new producer
# gets out of it. Seen when in-flight messages outlive message.timeout.ms (the broker then fences
# the producer on every partition) and when a broker comes back without its idempotence state.
PRODUCER_LEVEL = {
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.INVALID_PRODUCER_ID_MAPPING,
    KafkaError.INVALID_TXN_STATE,
    KafkaError._FENCED,
    KafkaError._FATAL,
    KafkaError._GAPLESS_GUARANTEE,
    KafkaError._INCONSISTENT,
    KafkaError._STATE,
}
# Errors that only say the broker was not there or not fast enough.
TRANSIENT = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError._QUEUE_FULL,
}


def describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


def classify(err: KafkaError) -> str:
    """'producer', 'permanent', 'systemic', 'transient', 'released' or 'retry' for a per-message error
    (a BATCH_REFUSALS code is 'permanent': its delivery report is judged further in delivery.py)."""
    code = err.code()
    if err.fatal() or code in PRODUCER_LEVEL:
        return "producer"
    if code in PER_EVENT_PERMANENT:
        return "permanent"
    if code in PER_EVENT_RETRY:
        return "retry"
    if code in RELEASED:
        return "released"
    if code in SYSTEMIC:
        return "systemic"
    if code in TRANSIENT or err.retriable():
        return "transient"
    return "retry"
