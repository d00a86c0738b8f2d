"""Full speed from the first claim (issue 16): the workers of a supervisor split the shards in their
first lease round, and a joining or leaving replica is noticed at once, not at the next renewal.

The lease TTL is 600 s here, so a renewal round comes only every 200 s: whatever rebalancing
happens within a test's (generous) wait can only have come from the first round's count of the
supervisor's own workers, or from a notification (LISTEN), or from the polled census (transaction
pool mode). No timing is asserted; performance is the bench's (`python -m bench cold`).
"""

import signal

import pytest

from tests.helpers import Load, assert_per_key_order, status_counts, wait_balanced, wait_for

TTL = "600"


def test_the_workers_of_a_supervisor_split_the_shards_in_their_first_round(db_url, start_tier):
    tier = start_tier(OUTBOX_WORKERS="2", OUTBOX_LEASE_TTL_SECONDS=TTL)
    wait_balanced(db_url, 2)

    def rebalances() -> list[dict]:
        return [line for line in tier.logs() if line.get("event") == "rebalance"]
    # A worker logs its round a moment after the commit the test has just seen.
    wait_for(lambda: len(rebalances()) >= 2, 10, "both workers' first rounds logged")
    rounds = rebalances()
    # Each worker's first round took its half; nobody ever took all 256 and gave half back.
    assert len(rounds) == 2, rounds
    assert sorted(line["acquired"] for line in rounds) == [128, 128]
    assert all(line["released"] == 0 and line["owned"] == 128 for line in rounds)
    assert tier.stop() == 0
    # At the drain each worker releases its shards and notifies; the other, draining too, takes none.
    lines = tier.logs()
    drain_at = next(i for i, line in enumerate(lines) if line.get("event") == "drain started")
    assert not [line for line in lines[drain_at:] if line.get("event") == "rebalance" and line.get("acquired")]
    assert sorted(line["shards"] for line in lines if line.get("event") == "drain done") == [128, 128]


@pytest.mark.parametrize("pool_mode", [
    pytest.param("session", marks=pytest.mark.not_via_pgbouncer(
        "OUTBOX_POOL_MODE=session (LISTEN keepers) cannot go through a transaction pooler; the "
        "transaction variant runs through PgBouncer")),
    "transaction",
])
def test_a_joining_and_a_leaving_replica_are_noticed_without_a_renewal(db_url, topic, start_tier, topic_reader,
                                                                       pool_mode):
    """session: the keepers LISTEN; transaction (a pooler in front: no LISTEN): they poll the census."""
    # transaction: no OUTBOX_LISTEN_DATABASE_URL, even when the tiers go through PgBouncer.
    no_listen = {"OUTBOX_LISTEN_DATABASE_URL": ""} if pool_mode == "transaction" else {}

    def start(name: str):
        return start_tier(name=name, OUTBOX_WORKERS="2", OUTBOX_LEASE_TTL_SECONDS=TTL, OUTBOX_POOL_MODE=pool_mode,
                          **no_listen)

    first = start("a")
    # The first replica's workers at 128 shards.
    wait_balanced(db_url, 2, of=first.worker_ids)
    with Load(db_url, topic, keys=100) as load:
        second = start("b")
        # The first replica's keepers hear of the newcomers and hand over; the newcomers take it:
        # four workers at 64 shards each, long before any renewal.
        wait_balanced(db_url, 4, 60, of=lambda: first.worker_ids() | second.worker_ids())
        # A drained replica releases its shards and leaves: the others take them at once.
        assert second.stop() == 0
        wait_balanced(db_url, 2, 60, of=first.worker_ids)
        wait_for(lambda: len(load.committed) > 0, 10, "load running")
        committed = load.stop()
    wait_for(lambda: status_counts(db_url) == {"published": len(committed)}, 120, "every committed event published")
    messages = topic_reader(topic).read_ids(committed, timeout=120)
    assert_per_key_order(messages)
    assert first.stop(signal.SIGTERM) == 0
