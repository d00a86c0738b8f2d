"""Records read back from the broker by position: one partition's offsets, or one record.

A consumer with no group membership (assign, never subscribe) and no commits: reading here
changes nothing on the broker. Made from the tier's own KAFKA_* settings (SASL, TLS), minus the
producer-only ones, so it reaches the broker exactly as the tier does.

Blocking calls: the worker's auditor runs them in a thread.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from kaireon_pub.logs import librdkafka_logger

log = logging.getLogger("kaireon_pub.audit.broker")
_NOT_ALLOWED = (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED)

# Producer settings a consumer refuses or must not be given (librdkafka warns on the others).
_PRODUCER_ONLY_PREFIXES = ("enable.idempotence", "acks", "message.timeout.ms", "linger.ms",
                           "compression.type", "queue.buffering.", "batch.", "retries",
                           "delivery.timeout.ms", "request.required.acks", "enable.gapless.guarantee",
                           "max.in.flight", "transactional.", "retry.backoff", "sticky.partitioning",
                           "partitioner", "topic.metadata.propagation")


@dataclass(frozen=True)
class StoredRecord:
    """One record as the broker returned it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    def header(self, name: str) -> bytes | None:
        """The last value of header `name` (None when absent)."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    @property
    def event_id(self) -> int | None:
        """The tier's `event-id` header as an integer (None when absent or not a number): the first
        one, since the tier's own headers come before the event's (which may hold one of that name).
        audit/compare.py's record_event_id also takes `ce_id` when there is no `event-id`."""
        raw = next((value for key, value in self.headers if key == "event-id"), None)
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None


def consumer_config(producer_config: Mapping[str, str], client_id: str = "kaireon-pub-audit") -> dict[str, Any]:
    """The tier's librdkafka settings for a reading consumer."""
    config: dict[str, Any] = {k: v for k, v in producer_config.items()
                              if not k.startswith(_PRODUCER_ONLY_PREFIXES)}
    config.update({
        "group.id": f"{client_id}-{uuid.uuid4().hex[:8]}",  # never joined: assign() only
        "client.id": client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "error",  # an offset the broker no longer has is a finding, not a jump
        "enable.partition.eof": True,
        "logger": librdkafka_logger(),
    })
    return config


class RecordReader:
    """Reads records of a topic back by partition and offset. Close it (or use `with`)."""

    def __init__(self, producer_config: Mapping[str, str], client_id: str = "kaireon-pub-audit"):
        self._consumer = Consumer(consumer_config(producer_config, client_id))
        self._admin_config: dict[str, Any] = {k: v for k, v in producer_config.items()
                                              if not k.startswith(_PRODUCER_ONLY_PREFIXES)}
        self._admin_config.update({"client.id": client_id, "logger": librdkafka_logger()})
        self._admin: AdminClient | None = None
        self._refused: set[str] = set()  # topics whose configs the broker would not describe

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._consumer.close()

    def partitions(self, topic: str, timeout: float = 10.0) -> list[int] | None:
        """The topic's partitions, or None when the broker does not know the topic."""
        meta = self._consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            return None
        return sorted(meta.partitions)

    def compacted(self, topic: str, timeout: float = 10.0) -> bool:
        """Whether the topic's cleanup.policy includes `compact` (the broker may remove a record
        superseded by a later one of its key, leaving a gap in the offsets). Without the right to
        describe the topic's configs (an ACL without DescribeConfigs) it is taken as not compacted,
        logged once per topic. Raises KafkaException when the broker cannot tell otherwise (an
        unknown topic: ask partitions() first)."""
        if self._admin is None:
            self._admin = AdminClient(self._admin_config)
        resource = ConfigResource(ResourceType.TOPIC, topic)
        try:
            entries = self._admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() not in _NOT_ALLOWED:
                raise
            if topic not in self._refused:
                self._refused.add(topic)
                log.warning(f"audit: {topic}'s cleanup.policy cannot be read ({exc.args[0].str()}): judged as not "
                            f"compacted; grant DescribeConfigs on the topic",
                            extra={"event": "audit policy unknown", "topic": topic})
            return False
        policy = entries.get("cleanup.policy")
        return policy is not None and "compact" in (policy.value or "").replace(" ", "").split(",")

    def watermarks(self, topic: str, partition: int, timeout: float = 10.0) -> tuple[int, int]:
        """(low, high): the first offset still stored and the next offset to be written."""
        return self._consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)

    def read_range(self, topic: str, partition: int, start: int, end: int,
                   timeout: float = 30.0) -> Iterator[StoredRecord]:
        """Every record of [start, end) still stored, in offset order (offsets a compacted or
        transactional log skips are skipped). Stops at the partition's end; raises TimeoutError
        when the broker gives nothing for `timeout` s while records remain."""
        if end <= start:
            return
        self._consumer.assign([TopicPartition(topic, partition, start)])
        try:
            deadline = time.monotonic() + timeout
            while True:
                msg = self._consumer.poll(0.5)
                if msg is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{topic}[{partition}]: no record from offset {start} in {timeout:.0f} s")
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        return
                    if error.code() in (KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET):
                        return  # below the log start (deleted, a recreated topic) or past its end (reset=error)
                    if error.retriable() or not error.fatal():
                        if time.monotonic() > deadline:
                            raise KafkaException(error)
                        continue
                    raise KafkaException(error)
                deadline = time.monotonic() + timeout
                offset = msg.offset()
                if offset >= end:
                    return
                yield StoredRecord(topic, msg.partition(), offset, msg.key(), msg.value(),
                                   tuple(msg.headers() or ()))
                if offset + 1 >= end:
                    return
        finally:
            self._consumer.unassign()

    def read_at(self, topic: str, partition: int, offset: int, timeout: float = 10.0) -> StoredRecord | None:
        """The record at exactly this offset, or None when the partition does not hold it."""
        for record in self.read_range(topic, partition, offset, offset + 1, timeout):
            return record if record.offset == offset else None
        return None
