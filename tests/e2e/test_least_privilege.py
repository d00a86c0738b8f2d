"""The tier under least privilege, end to end (README, "Database roles"): `migrate` as the owner, the
grants `kaireon-pub grants` prints, `run` and `reap` as the runtime role, `status` and `check` as the
read-only role; real PostgreSQL roles, a real broker, `kaireon-pub` as processes."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import psycopg
import pytest

from tests import helpers
from tests.roles import Roles

pytestmark = [
    pytest.mark.not_via_pgbouncer(
    "the session's PgBouncer knows one user (its userlist): these roles log in to the server directly"),
    pytest.mark.broker_agnostic("the roles and grants are the database's"),
]

DENIED = ("permission denied", "InsufficientPrivilege", "must be owner")


@pytest.fixture
def roles(pg) -> Iterator[Roles]:
    with Roles(pg).create(migrate_schema=False) as made:
        yield made


def cli(roles: Roles, role: str, broker, tmp_path, *args: str) -> helpers.subprocess.CompletedProcess:
    done = helpers.run_cli(*args, env=helpers.tier_env(roles.url(role), broker.bootstrap, tmp_path))
    assert done.returncode == 0, f"{args} as {role}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.parametrize("claim_mode", ["status", "lock"])
def test_the_tier_publishes_end_to_end_as_the_runtime_role(roles, broker, topic, start_tier, topic_reader,
                                                            tmp_path, claim_mode):
    cli(roles, roles.owner, broker, tmp_path, "migrate")
    with roles.admin() as admin:  # the grants as printed, applied by a superuser
        for role, kind in ((roles.runtime, "runtime"), (roles.readonly, "readonly")):
            admin.execute(cli(roles, roles.owner, broker, tmp_path, "grants", "--role", role, "--for", kind).stdout)
    # The application writes with a role of its own (here: the owner's).
    first = helpers.commit_events(roles.url(roles.owner), topic, 40, keys=5, phase="before")
    tier = start_tier(db_url=roles.url(roles.runtime), OUTBOX_WORKERS="2", OUTBOX_CLAIM_MODE=claim_mode)
    reader = topic_reader(topic)
    reader.read_ids(first, timeout=60)
    then = helpers.commit_events(roles.url(roles.owner), topic, 40, keys=5, phase="running")
    messages = reader.read_ids(then, timeout=60)
    helpers.assert_per_key_order(messages)
    helpers.wait_all_published(roles.url(), 80, 30, "every event published by the runtime role's tier")

    cli(roles, roles.runtime, broker, tmp_path, "reap")
    status = orjson.loads(cli(roles, roles.readonly, broker, tmp_path, "status", "--json").stdout)
    assert status["backlog"]["published"]["count"] == 80
    assert status["shards"]["liveWorkers"] == 2 and status["shards"]["owned"] == 256
    check = orjson.loads(cli(roles, roles.readonly, broker, tmp_path, "check", "--json", "--topic", topic,
                             "--no-auto-create").stdout)
    assert check["ok"] and {c["name"] for c in check["checks"]} >= {"database", "schema", "horizon", "topics"}
    assert tier.stop() == 0
    denied = [line for line in tier.log_path.read_text().splitlines() if any(d in line for d in DENIED)]
    assert denied == []


def test_a_long_transaction_of_another_role_is_seen_by_the_runtime_role(roles, broker, topic, start_tier,
                                                                       tmp_path):
    """With pg_read_all_stats (the grants' default) the runtime role's horizon sees how long another
    role's transaction has been open: passed over after OUTBOX_HORIZON_MAX_WAIT_MS, and named with
    its age by `status` as the read-only role."""
    cli(roles, roles.owner, broker, tmp_path, "migrate")
    roles.grant()
    with psycopg.connect(roles.url(roles.owner), application_name="report-job") as holder:
        holder.execute("SELECT pg_current_xact_id()")
        ids = helpers.commit_events(roles.url(roles.owner), topic, 10, keys=2, phase="behind")
        status = orjson.loads(cli(roles, roles.readonly, broker, tmp_path, "status", "--json").stdout)
        held = [h for h in status["horizon"]["heldBy"] if h["application"] == "report-job"]
        assert held and held[0]["ageSeconds"] is not None, status["horizon"]
        start_tier(db_url=roles.url(roles.runtime), OUTBOX_HORIZON_MAX_WAIT_MS="1000")
        helpers.wait_for(lambda: helpers.status_counts(roles.url()) == {"published": len(ids)}, 30,
                         "published past the other role's transaction once it was waited for long enough")
        holder.rollback()


def test_a_partitioned_outbox_publishes_as_the_runtime_role_its_partitions_made_by_the_owner(
        pg, broker, topic, start_tier, topic_reader, tmp_path):
    """Partition maintenance needs the ownership of outbox_events: `kaireon-pub partitions
    maintain` runs as the owner (README, "Database roles"); the runtime role's tier publishes
    through the parent and its worker 0 makes and drops nothing."""
    with Roles(pg).create(migrate_schema=False) as roles:
        owner = {"OUTBOX_PARTITIONING": "hourly"}
        helpers.run_cli("migrate", env=helpers.tier_env(roles.url(roles.owner), broker.bootstrap, tmp_path, **owner))
        roles.grant()
        before = helpers.run_cli("partitions", "list", "--json",
                                 env=helpers.tier_env(roles.url(roles.readonly), broker.bootstrap, tmp_path))
        assert before.returncode == 0, before.stderr
        maintained = helpers.run_cli("partitions", "maintain", "--ahead", "8",
                                     env=helpers.tier_env(roles.url(roles.owner), broker.bootstrap, tmp_path))
        assert maintained.returncode == 0, maintained.stderr
        ids = helpers.commit_events(roles.url(roles.owner), topic, 30, keys=3, phase="partitioned")
        tier = start_tier(db_url=roles.url(roles.runtime), OUTBOX_WORKERS="2", **owner)
        helpers.assert_per_key_order(topic_reader(topic).read_ids(ids, timeout=60))
        helpers.wait_all_published(roles.url(), 30, 30, "every event of the partitioned outbox published")
        status = helpers.run_cli("status", "--json",
                                 env=helpers.tier_env(roles.url(roles.readonly), broker.bootstrap, tmp_path))
        assert status.returncode == 0, status.stderr
        assert orjson.loads(status.stdout)["partitions"]["count"] >= 9
        assert tier.stop() == 0
        denied = [orjson.loads(line) for line in tier.log_path.read_text().splitlines()
                  if any(d in line for d in DENIED)]
        assert denied == []  # worker 0 sees that it does not own the table and leaves maintenance alone
        assert tier.wait_log(lambda e: e.get("event") == "partition maintenance skipped", 5,
                             "worker 0 saying partition maintenance is the owner's job")
