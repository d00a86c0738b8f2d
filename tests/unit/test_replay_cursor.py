"""`replay --resume`: the cursor moves only over an unbroken run of acknowledgements (no services)."""

from __future__ import annotations

from kaireon_pub.ops.replay import START, Cursor


def positions(n: int, xid: str = "900") -> list[tuple[str, int]]:
    return [(xid, i) for i in range(1, n + 1)]


def test_acknowledgements_out_of_order_move_the_cursor_only_over_the_unbroken_prefix():
    cursor = Cursor()
    seqs = [cursor.sent(p) for p in positions(5)]
    assert cursor.position == START and cursor.in_flight == 5
    for seq in (seqs[1], seqs[2], seqs[4]):  # 2, 3 and 5 acknowledged; 1 and 4 not yet
        cursor.acked(seq)
    assert cursor.advance() == 0 and cursor.position == START
    cursor.acked(seqs[0])
    assert cursor.advance() == 3 and cursor.position == ("900", 3)
    assert cursor.in_flight == 2  # 4 in flight, 5 acknowledged behind it: both re-sent on a resume
    cursor.acked(seqs[3])
    assert cursor.advance() == 2 and cursor.position == ("900", 5) and cursor.in_flight == 0


def test_a_failed_record_holds_the_cursor_before_it_for_ever():
    cursor = Cursor(("5", 10))
    seqs = [cursor.sent(p) for p in [("5", 11), ("6", 3), ("6", 12)]]
    cursor.acked(seqs[0])
    cursor.acked(seqs[2])  # seqs[1] failed: never acknowledged
    cursor.advance()
    assert cursor.position == ("5", 11)  # a resume starts after 11: (6, 3) and (6, 12) go again
    assert cursor.advance() == 0


def test_a_resumed_cursor_starts_where_it_was_saved_and_nothing_sent_leaves_it():
    cursor = Cursor(("77", 500))
    assert cursor.advance() == 0 and cursor.position == ("77", 500)


def test_many_in_random_order_end_at_the_last():
    import random

    cursor = Cursor()
    seqs = [cursor.sent(p) for p in positions(1000)]
    random.Random(7).shuffle(seqs)
    seen_positions = []
    for seq in seqs:
        cursor.acked(seq)
        cursor.advance()
        seen_positions.append(cursor.position[1])
    assert seen_positions == sorted(seen_positions)  # never moves back
    assert cursor.position == ("900", 1000) and cursor.in_flight == 0
