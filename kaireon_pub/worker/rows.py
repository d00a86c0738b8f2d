"""The worker's shared types: a claimed row and the result of one tick.

Kept apart from the loop and its parts so that the publisher, the scan and the settle step can
use them without importing one another (and closing an import circle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Row(NamedTuple):
    """One claimed outbox row, in the column order of claim_locked_batch's SELECT list (which
    claim_batch returns as it is). The shard scan (worker/scan.py) reads a claim's tuples by
    position (id 0, topic 1, key 2, attempts 6, shard 7, xid 8): new columns go at the end."""

    id: int
    topic: str
    key: str | None  # partition_key: the key's text ('\\x' + hex when key_bytes is set)
    payload: bytes | None  # the record's value; None: a tombstone
    headers: str  # the str-valued headers, a JSON object as text (older rows: any JSON value)
    event_type: str | None
    attempts: int
    shard: int
    xid: int
    created_epoch: float
    created_iso: str
    binary_headers: str = "{}"  # the bytes-valued headers: a JSON object of base64 text
    key_bytes: bytes | None = None  # the record's exact key when it is not text

    @property
    def position(self) -> tuple[int, int]:
        """Where the row sits in its shard's claim order: (xid, id)."""
        return (self.xid, self.id)


@dataclass
class TickResult:
    claimed: int = 0
    published: int = 0
    failed: int = 0
    retried: int = 0
    released: int = 0
    lease_lost: int = 0
