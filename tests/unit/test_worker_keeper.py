"""The lease keeper's rounds without a database (tests/unit/worker_fakes.py: a lease table): when
it looks again soon (a peer is handing shards over), and worker 0's cleanup of dead registrations."""

from __future__ import annotations

import asyncio

import pytest

from kaireon_pub.db.queries import Q
from kaireon_pub.worker.keeper import FORGET_INTERVAL_S, LeaseKeeper
from kaireon_pub.worker.leases import SHARDS
from tests.unit.worker_fakes import FakeLeaseConn, LeaseTable, fake_leases


def keepers(table: LeaseTable, n: int) -> list[LeaseKeeper]:
    async def connect():
        return FakeLeaseConn(table)

    return [LeaseKeeper(fake_leases(table, slot), connect, lambda _result: None, listen=False) for slot in range(n)]


async def rounds(ks: list[LeaseKeeper]) -> list[bool]:
    """One round of each keeper, in turn; whether each wants to look again soon."""
    return [await k.round(until=0.0) for k in ks]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 12, 100])
def test_once_the_shards_are_shared_no_keeper_keeps_a_short_round(n):
    """With 3 workers two hold 86 shards and one 84 for good: that one must not look again every
    0.5 s for ever (nor end frozen owners every round) for 2 shards nobody will hand over."""
    table = LeaseTable(live=n)
    ks = keepers(table, n)

    async def scenario():
        await rounds(ks)  # everyone takes up to its fair share
        table.sent.clear()
        return await rounds(ks)

    assert asyncio.run(scenario()) == [False] * n
    assert sum(len(k.leases.owned) for k in ks) == SHARDS
    assert Q.terminate_frozen_owners not in table.sent


def test_a_worker_that_joins_below_its_share_looks_again_soon_until_the_others_hand_over():
    table = LeaseTable(live=2)
    ks = keepers(table, 2)

    async def scenario():
        await rounds(ks)  # 128 each
        table.live = 3
        joined = keepers(table, 3)[2]
        ks.append(joined)
        first = await joined.round(until=0.0)  # nothing free yet: the others hold 128 each
        for k in ks[:2]:
            await k.round(until=1e12)  # above the fair share (86): they give 42 each back
        second = await joined.round(until=0.0)
        return first, second, len(joined.leases.owned)

    assert asyncio.run(scenario()) == (True, False, 84)


def test_worker_0_forgets_dead_registrations_at_its_first_round_and_then_every_interval():
    table = LeaseTable(live=2)
    ks = keepers(table, 2)

    async def scenario():
        sent = []
        for _ in range(3):
            table.sent.clear()
            await rounds(ks)
            sent.append(table.sent.count(Q.forget_dead_workers))
        ks[0].forget_due -= FORGET_INTERVAL_S  # the interval has passed
        table.sent.clear()
        await rounds(ks)
        sent.append(table.sent.count(Q.forget_dead_workers))
        return sent

    assert asyncio.run(scenario()) == [1, 0, 0, 1]  # worker 1 never sends it


def test_free_shards_it_cannot_take_end_their_frozen_owners_sessions():
    table = LeaseTable(live=3)
    table.locked = {0, 1, 2}  # expired, but a frozen owner's claim still locks them
    ks = keepers(table, 3)
    asyncio.run(rounds(ks))
    assert Q.terminate_frozen_owners in table.sent
