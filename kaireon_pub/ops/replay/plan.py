"""What one replay run does (its Plan: the selection, the target, the rate, new or resumed) and what
it has done so far (its Progress: the counts, the first failure, the times)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kaireon_pub.ops.replay.selection import Selection

DEFAULT_RATE = 1000.0  # events/s when --rate is not given
SHOW_IDS = 20


@dataclass
class Plan:
    """What a run does: new (`run_id` None) or resumed."""

    selection: Selection
    to_topic: str | None = None
    rate: float | None = None  # events/s as given (0: no cap); None: DEFAULT_RATE, or a resumed run's own
    run_id: int | None = None
    operator: str | None = None

    def cap(self) -> float | None:
        """The effective cap of a new run: None for no cap."""
        rate = DEFAULT_RATE if self.rate is None else self.rate
        return rate if rate > 0 else None


@dataclass
class Progress:
    selected: int = 0  # in the selection at the run's start
    remaining: int = 0  # after the cursor, when this process started
    published: int = 0  # acknowledged by this process
    skipped: int = 0
    skipped_ids: list[int] = field(default_factory=list)  # the first SHOW_IDS, and why the first was
    skip_reason: str | None = None
    failed: str | None = None
    started: float = field(default_factory=time.monotonic)
    first_sent: float | None = None
    last_acked: float | None = None
