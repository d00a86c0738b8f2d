"""What became of each event of one batch (no imports of the tier: the loop, the delivery batch
and the spans all read it).

Each event ends the batch in exactly one bucket:
- delivered: the broker acknowledged it (mark published, with where it landed: `partitions` and
  `offsets`, parallel to `delivered`, from its delivery report);
- rejected: the event's own permanent fault, e.g. too large for the broker, headers (or
  binary_headers) that are not a JSON object, a binary header value that is not base64, an
  invalid topic name (mark failed now);
- retry: a per-event error of unknown kind (attempts + 1, exponential back-off);
- released: not the event's fault (broker down, timeout, a producer that must be recreated, the
  drain or lease deadline, held back behind a rejected event of the same key, or, in strict
  order, behind an event of the same key on another topic that was not delivered, or refused by
  the broker with a record batch it shared: another record's fault, or a suspect's): back to
  pending, attempts untouched.

Suspects (a part of released): the broker refused their record batch whole as too large
(MSG_SIZE_TOO_LARGE, RECORD_LIST_TOO_LARGE) while they shared it; whose size it was, only a record
handed over alone can tell. The publisher hands each over alone next time: refused alone, it is
rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BatchOutcome:
    delivered: list[int] = field(default_factory=list)
    # Where each delivered event landed, parallel to `delivered`: its delivery report's partition and
    # offset. An offset librdkafka reports as negative is None here, NULL in the row (delivery.py).
    partitions: list[int] = field(default_factory=list)
    offsets: list[int | None] = field(default_factory=list)
    ages: list[float] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    retry: dict[int, str] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)
    suspects: list[int] = field(default_factory=list)
    # Released rows that had been handed to librdkafka: the broker may have them already, so a
    # later publish of these may be a duplicate (counted in kaireon_outbox_unconfirmed_total).
    unconfirmed: int = 0
    transient_error: str | None = None
    systemic_error: str | None = None
    producer_error: str | None = None
