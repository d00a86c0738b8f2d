"""Where the claim looks next in each shard: pure state, no I/O.

Each owned shard's claim scans it in (xid, id) order from a cursor: the position of the last row
the claim looked at. The cursor moves forward with every claim and back (a rewind) to rows that
went back to pending behind it. A shard is scanned again from its start when a retry in it falls
due, when a row another session locks should be looked at again, and every shard every
OUTBOX_RESCAN_INTERVAL_MS; a shard that comes or goes starts afresh. The claim starts from a
different owned shard each time (rotation), so a busy shard never starves the others.

Rows another session locks (`busy`): the careful claim steps around each and holds back the later
rows of its key (shard -> key -> (xid, id) of its first busy row; a NULL key holds nothing).
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Iterable

from kaireon_pub import metrics
from kaireon_pub.db.queries import int_array
from kaireon_pub.worker.rows import Row

log = logging.getLogger("kaireon_pub.worker")

ZERO_CURSOR = (0, 0)
CLAIM_ORDER = operator.itemgetter(8, 0)  # a claimed row's (xid, id): Row.position of the claim's tuple
ROW_FIELDS = len(Row._fields)
_as_row = tuple.__new__  # a Row from the claim's tuple as it is (its columns are Row's, in order)
BUSY_RECHECK_S = 1.0  # how often a shard with a row another session locks is scanned again from its start

Position = tuple[int, int]


class ShardScan:
    def __init__(self, *, strict: bool, batch_size: int, rescan_interval_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.strict = strict
        self.batch_size = batch_size
        self.rescan_interval_s = rescan_interval_s
        self.clock = clock
        self.cursors: dict[int, Position] = {}
        self.rescan_at: dict[int, float] = {}
        self.busy: dict[int, dict[str | None, Position]] = {}
        self.careful_until = 0.0
        self.locked_seen: dict[int, float] = {}  # busy event id -> last met (logged and counted once)
        self.next_full_rescan = clock() + rescan_interval_s
        self.rotation = 0
        self.last_claim_full = False  # the last claim looked at a full batch: claim again at once

    # ---- the claim's view ----------------------------------------------------------------------

    def rotated(self, owned: Iterable[int]) -> list[int]:
        shards = sorted(owned)
        if not shards:
            return []
        self.rotation = (self.rotation + 1) % len(shards)
        return shards[self.rotation:] + shards[:self.rotation]

    def cursor_params(self, shards: list[int]) -> dict[str, str]:
        return {"cursor_xids": int_array(self.cursors.get(sh, ZERO_CURSOR)[0] for sh in shards),
                "cursor_ids": int_array(self.cursors.get(sh, ZERO_CURSOR)[1] for sh in shards)}

    def careful(self) -> bool:
        return bool(self.busy) or self.clock() < self.careful_until

    def with_busy(self, params: dict) -> dict:
        held = [(shard, key, pos) for shard, keys in self.busy.items() for key, pos in keys.items()]
        return {**params, "busy_shards": int_array(h[0] for h in held), "busy_keys": [h[1] for h in held],
                "busy_xids": int_array(h[2][0] for h in held), "busy_ids": int_array(h[2][1] for h in held)}

    # ---- what a claim returned -------------------------------------------------------------------

    def take_claimed(self, raw: list[tuple]) -> list[Row]:
        """The claimed rows of a claim's result, in per-key order; the cursors move past every row
        the claim looked at, also those it held back (a NULL topic): the cursor comes back to them
        when the event they wait for settles."""
        # Per-key order is (xid, id) within a shard; keys never span shards.
        raw.sort(key=CLAIM_ORDER)
        if raw and len(raw[0]) != ROW_FIELDS:
            raise TypeError(f"the claim returned {len(raw[0])} columns, a Row has {ROW_FIELDS}")
        rows = [_as_row(Row, r) for r in raw if r[1] is not None]
        # A row another session locks comes back like a held row, but with its attempts and key.
        busy = [r for r in raw if r[1] is None and r[6] is not None]
        if busy:
            self.note_busy(busy)
        self.last_claim_full = len(raw) >= self.batch_size
        # In claim order, each shard's last row is its furthest position.
        for shard, r in {r[7]: r for r in raw}.items():
            position = (r[8], r[0])
            if position > self.cursors.get(shard, ZERO_CURSOR):
                self.cursors[shard] = position
        return rows

    def met_locked_row(self) -> None:
        metrics.CLAIM_LOCK_CONFLICTS.inc()
        # Stay careful a while: a shard rescan forgets its busy rows, then meets them again.
        self.careful_until = self.clock() + 3 * BUSY_RECHECK_S

    def note_busy(self, busy_rows: list[tuple]) -> None:
        """Rows the careful claim could not lock: their keys wait, their shards are scanned again
        from the start soon (the scan meets each such row before the later rows of its key)."""
        now = self.clock()
        # An event met again within a few rechecks is the same lock: one line, one count.
        self.locked_seen = {i: t for i, t in self.locked_seen.items() if now - t < 5 * BUSY_RECHECK_S}
        for r in busy_rows:
            shard, key, position = r[7], r[2], (r[8], r[0])
            if r[0] not in self.locked_seen:
                log.warning("event locked by another session: the claim steps around it until the lock ends",
                            extra={"event": "event locked by another session", "eventId": r[0], "shard": shard})
                if not self.strict and key is not None:
                    metrics.ORDER_VIOLATIONS.inc()  # relaxed: its key flows on past it
            self.locked_seen[r[0]] = now
            keys = self.busy.setdefault(shard, {})
            if key not in keys or position < keys[key]:
                keys[key] = position
            self.rescan_at[shard] = min(self.rescan_at.get(shard, float("inf")), now + BUSY_RECHECK_S)
        self.careful_until = now + 3 * BUSY_RECHECK_S
        self._busy_changed()

    # ---- moving back ---------------------------------------------------------------------------

    def rewind(self, shard: int, position: Position) -> None:
        if shard in self.cursors and position < self.cursors[shard]:
            self.cursors[shard] = position

    def rewind_every(self, position: Position) -> None:
        """Rows may have gone back to pending at `position` in any shard (a passed-over transaction
        ended): every cursor past it goes back to it."""
        for shard in self.cursors:
            self.rewind(shard, position)

    def rescan_after(self, shard: int, delay_s: float) -> None:
        """Scan the shard again from its start in `delay_s` (a retry waits behind its cursor)."""
        due = self.clock() + max(0.0, delay_s) + 0.01
        self.rescan_at[shard] = min(self.rescan_at.get(shard, float("inf")), due)

    def apply_rescans(self) -> None:
        now = self.clock()
        if now >= self.next_full_rescan:
            self.cursors.clear()
            self.rescan_at.clear()
            self.forget_busy(list(self.busy))
            self.next_full_rescan = now + self.rescan_interval_s
            return
        for shard in [sh for sh, at in self.rescan_at.items() if at <= now]:
            self.cursors.pop(shard, None)
            del self.rescan_at[shard]
            self.forget_busy([shard])

    def full_rescan_now(self) -> None:
        self.next_full_rescan = self.clock()

    def rescan_all(self) -> None:
        """Rows went back to pending behind the cursors (a NOTIFY on the rescan channel)."""
        self.forget_cursors()
        self.forget_busy(list(self.busy))

    def forget_cursors(self) -> None:
        """This worker's own rows went back to pending behind the cursors (its orphaned claims reset):
        every owned shard is scanned again from its start; rescans due and busy rows stay."""
        self.cursors.clear()

    def forget_busy(self, shards: list[int]) -> None:
        """Its cursor back at the start, a shard's scan meets its busy rows again before the later
        rows of their keys: the claim learns afresh whether they are still locked."""
        forgot = [shard for shard in shards if self.busy.pop(shard, None) is not None]
        if forgot:
            self._busy_changed()

    def shards_changed(self, acquired: list[int], gone: list[int]) -> None:
        """Shards taken start from their beginning; shards released or lost are forgotten."""
        for shard in acquired:
            self.cursors.pop(shard, None)
        for shard in gone:
            self.cursors.pop(shard, None)
            self.rescan_at.pop(shard, None)
        self.forget_busy(acquired + gone)

    def _busy_changed(self) -> None:
        metrics.LOCKED_EVENTS.set(sum(len(keys) for keys in self.busy.values()))
