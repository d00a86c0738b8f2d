"""`replay --resume`'s cursor: where a run resumes, moved only over an unbroken run of acknowledgements."""

from __future__ import annotations

from kaireon_pub.ops.replay.selection import START


class Cursor:
    """The resume cursor: records are sent in (xid, id) order and acknowledged in any order; the
    cursor is the last position acknowledged together with every position sent before it."""

    def __init__(self, start: tuple[str, int] = START):
        self.position = start
        self._sent: dict[int, tuple[str, int]] = {}  # sequence number -> position, in send order
        self._acked: set[int] = set()
        self._head = 0  # the lowest sequence number not passed yet
        self._next = 0

    def sent(self, position: tuple[str, int]) -> int:
        """A record of `position` was handed over; its sequence number, for `acked`."""
        seq = self._next
        self._next += 1
        self._sent[seq] = position
        return seq

    def acked(self, seq: int) -> None:
        self._acked.add(seq)

    def advance(self) -> int:
        """Moves the cursor over the unbroken run of acknowledgements; how many it passed."""
        passed = 0
        while self._head in self._acked:
            self._acked.discard(self._head)
            self.position = self._sent.pop(self._head)
            self._head += 1
            passed += 1
        return passed

    @property
    def in_flight(self) -> int:
        """Sent and not passed by the cursor (not acknowledged, or behind one that is not)."""
        return len(self._sent)

