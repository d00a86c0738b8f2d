"""Full speed from the first claim (issue 16): the workers of a supervisor split the shards in their
first lease round, and a joining or leaving replica is noticed at once, not at the next renewal.

The lease TTL is 600 s here, so a renewal round comes only every 200 s: whatever rebalancing
happens within a test's (generous) wait can only have come from the first round's count of the
supervisor's own workers, or from a notification (LISTEN), or from the polled census (transaction
pool mode). No timing is asserted; performance is the bench's (`python -m bench cold`).
"""

import signal

import psycopg
import pytest

from tests.helpers import (
    Load,
    TopicReader,
    assert_per_key_order,
    event_ids,
    status_counts,
    tier_env,
    wait_for,
)

TTL = "600"


def owners(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return {str(owner): n for owner, n in conn.execute(
            "SELECT owner, count(*) FROM outbox_shard_leases WHERE owner IS NOT NULL "
            "AND expires_at > clock_timestamp() GROUP BY owner")}


def worker_ids(tier) -> set[str]:
    return {line["workerId"] for line in tier.logs() if line.get("event") == "worker spawned"}


def shares(db_url: str, tier) -> list[int]:
    held = owners(db_url)
    return sorted(held.get(w, 0) for w in worker_ids(tier))


def test_the_workers_of_a_supervisor_split_the_shards_in_their_first_round(db_url, broker, topic, tmp_path,
                                                                           run_tier):
    tier = run_tier(tier_env(db_url, broker.bootstrap, tmp_path, OUTBOX_WORKERS="2", OUTBOX_LEASE_TTL_SECONDS=TTL))
    wait_for(lambda: sorted(owners(db_url).values()) == [128, 128], 30, "256 shards split between 2 workers")

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
def test_a_joining_and_a_leaving_replica_are_noticed_without_a_renewal(db_url, broker, topic, tmp_path, run_tier,
                                                                       pool_mode):
    """session: the keepers LISTEN; transaction (a pooler in front: no LISTEN): they poll the census."""
    # transaction: no OUTBOX_LISTEN_DATABASE_URL, even when the tiers go through PgBouncer.
    no_listen = {"OUTBOX_LISTEN_DATABASE_URL": ""} if pool_mode == "transaction" else {}

    def start(name: str):
        (tmp_path / name).mkdir()
        return run_tier(tier_env(db_url, broker.bootstrap, tmp_path / name, OUTBOX_WORKERS="2",
                                 OUTBOX_LEASE_TTL_SECONDS=TTL, OUTBOX_POOL_MODE=pool_mode, **no_listen), name=name)

    first = start("a")
    wait_for(lambda: shares(db_url, first) == [128, 128], 30, "the first replica's workers at 128 shards")
    with Load(db_url, topic, keys=100) as load:
        second = start("b")
        # The first replica's keepers hear of the newcomers and hand over; the newcomers take it.
        wait_for(lambda: shares(db_url, first) == [64, 64] and shares(db_url, second) == [64, 64], 60,
                 "four workers at 64 shards each, long before any renewal")
        # A drained replica releases its shards and leaves: the others take them at once.
        assert second.stop() == 0
        wait_for(lambda: shares(db_url, first) == [128, 128], 60, "the drained replica's shards taken over")
        wait_for(lambda: len(load.committed) > 0, 10, "load running")
        committed = load.stop()
    wait_for(lambda: status_counts(db_url) == {"published": len(committed)}, 120, "every committed event published")
    reader = TopicReader(broker.bootstrap, topic)
    messages = reader.read_until(lambda msgs: set(committed) <= set(event_ids(msgs)), timeout=120)
    reader.close()
    assert_per_key_order(messages)
    assert first.stop(signal.SIGTERM) == 0
