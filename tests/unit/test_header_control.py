"""The header-control entry of a row (worker/kafka/records.py), which the trigger of an attached
Debezium outbox table writes: read by the tier, never sent."""

from __future__ import annotations

import json

from kaireon_pub.worker.kafka.records import HEADERS_CONTROL, record_headers
from kaireon_pub.worker.rows import Row

CREATED = "2026-12-02T00:00:00.000000Z"


def row(headers: str) -> Row:
    return Row(7, "outbox.event.Order", "1", b"{}", headers, "OrderCreated", 0, 0, 1000, 0.0, CREATED)


def test_own_only_leaves_out_the_tiers_headers_and_the_control_entry():
    headers = record_headers(row(json.dumps({"id": "4d47e190-0402-4048-bc2c-89dd54343cdc",
                                                HEADERS_CONTROL: "own-only"})))
    assert headers == [("id", b"4d47e190-0402-4048-bc2c-89dd54343cdc")]


def test_another_control_value_keeps_the_tiers_headers_and_is_not_sent():
    headers = record_headers(row(json.dumps({"id": "x", HEADERS_CONTROL: "all"})))
    assert headers == [("event-id", b"7"), ("event-type", b"OrderCreated"), ("created-at", CREATED.encode()),
                       ("id", b"x")]


def test_cloudevents_attributes_stay_with_own_only():
    headers = record_headers(row(json.dumps({"id": "x", HEADERS_CONTROL: "own-only"})), "/orders")
    assert [name for name, _ in headers][:2] == ["ce_specversion", "ce_id"]
    assert "event-id" not in dict(headers) and HEADERS_CONTROL not in dict(headers)
