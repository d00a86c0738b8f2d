"""The worker's shared types: a claimed row and the result of one tick.

Kept apart from loop.py so that the publisher, the settle step and the lease keeper can use them
without importing the loop (and closing an import circle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Row(NamedTuple):
    """One claimed outbox row, in the column order of the claim queries' RETURNING lists."""

    id: int
    topic: str
    key: str | None
    payload: str  # the jsonb value rendered as text
    headers: str  # the jsonb headers rendered as text
    event_type: str | None
    attempts: int
    shard: int
    xid: int
    created_epoch: float
    created_iso: str

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
