"""`replay`'s selection: which retained events a run takes (keys, id range, a published_at window,
topics), as the statements' parameters and as the run's row keeps it; and the times it is given in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

START = ("0", 0)  # the cursor before any event: (xid, id)


def parse_time(text: str) -> datetime:
    """`audit`'s times, so that a window found there is given here as it was: an ISO 8601 time
    (`2026-12-06T12:00:00Z`, `2026-12-06 12:00+01:00`, a date; UTC when it names no zone) or a
    duration ago (90s, 30m, 6h, 7d), made absolute now. ValueError otherwise."""
    from kaireon_pub.ops.audit import parse_when

    return parse_when(text)


@dataclass(frozen=True)
class Selection:
    """Which retained events; every filter given must hold (AND). The window is over published_at,
    from `since` (inclusive) to `until` (exclusive)."""

    keys: tuple[str, ...] = ()
    id_from: int | None = None
    id_to: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    topics: tuple[str, ...] = ()

    def validate(self) -> str | None:
        """None when usable, else what is wrong (for a usage error)."""
        if self.id_from is not None and self.id_to is not None and self.id_from > self.id_to:
            return f"--id-from {self.id_from} is after --id-to {self.id_to}"
        if self.since is not None and self.until is not None and self.since >= self.until:
            return "--since must be before --until"
        if any(not key for key in self.keys):
            return "--key needs a non-empty key"
        if any(not topic for topic in self.topics):
            return "--topic needs a non-empty topic"
        return None

    def fixed(self, now: datetime) -> Selection:
        """The selection with its window's end fixed (`now` when --until was not given)."""
        return self if self.until is not None else Selection(self.keys, self.id_from, self.id_to, self.since,
                                                             now, self.topics)

    def params(self, cursor: tuple[str, int] = START) -> dict[str, object]:
        if self.until is None:
            raise ValueError("the window's end is fixed first (Selection.fixed)")
        return {"keys": list(self.keys) or None, "id_from": self.id_from, "id_to": self.id_to,
                "since": self.since, "until": self.until, "topics": list(self.topics) or None,
                "cursor_xid": cursor[0], "cursor_id": cursor[1]}

    def describe(self) -> dict[str, object]:
        """The selection as the run's row keeps it (and `from_json` reads it back)."""
        found: dict[str, object] = {"window": "published_at"}
        if self.keys:
            found["keys"] = list(self.keys)
        if self.id_from is not None:
            found["idFrom"] = self.id_from
        if self.id_to is not None:
            found["idTo"] = self.id_to
        if self.since is not None:
            found["since"] = self.since.isoformat()
        if self.until is not None:
            found["until"] = self.until.isoformat()
        if self.topics:
            found["topics"] = list(self.topics)
        return found

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Selection:
        def when(name: str) -> datetime | None:
            return parse_time(doc[name]) if doc.get(name) else None

        return cls(keys=tuple(doc.get("keys") or ()), id_from=doc.get("idFrom"), id_to=doc.get("idTo"),
                   since=when("since"), until=when("until"), topics=tuple(doc.get("topics") or ()))

