"""Compatibility re-export: the publisher now lives in kaireon_pub.worker.kafka (issue 24).

New code imports from the kafka modules; this one goes once nothing imports it."""

from kaireon_pub.worker.kafka.errors import classify, describe
from kaireon_pub.worker.kafka.outcome import BatchOutcome
from kaireon_pub.worker.kafka.publisher import Publisher
from kaireon_pub.worker.kafka.records import PoisonRow, record_headers, record_key

__all__ = ["BatchOutcome", "PoisonRow", "Publisher", "classify", "describe", "record_headers", "record_key"]
