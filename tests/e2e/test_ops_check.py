"""`kaireon-pub check`: passes on a good setup; fails naming the problem on each bad one."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from tests import helpers


def create_topic(bootstrap: str, name: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)]).values():
        future.result(timeout=10)
    helpers.wait_for(lambda: name in admin.list_topics(timeout=5).topics, 10, f"topic {name} listed")


def existing_topics(bootstrap: str) -> set[str]:
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).topics)


def check(env: dict[str, str], *args: str) -> tuple[int, dict[str, dict], str]:
    done = helpers.run_cli("check", "--json", *args, env=env)
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is (done.returncode == 0)
    return done.returncode, {c["name"]: c for c in report["checks"]}, done.stdout + done.stderr


def test_check_passes_on_a_good_setup(tier_env, broker, topic, db):
    create_topic(broker.bootstrap, topic)
    db.execute("INSERT INTO outbox_events (topic, payload) VALUES (%s, '{}')", (topic,))
    code, checks, _ = check(tier_env, "--topic", topic, "--no-auto-create")
    assert code == 0, checks
    assert [c["status"] for c in checks.values()] == ["ok"] * 10
    assert list(checks) == ["settings", "producer", "timeouts", "database", "pooler", "schema", "horizon", "keys",
                            "broker", "topics"]
    assert topic in checks["topics"]["detail"]

    done = helpers.run_cli("check", "--topic", topic, "--no-auto-create", env=tier_env)
    assert done.returncode == 0
    assert done.stdout.splitlines()[-1] == "check passed: 10 checks"


def test_check_fails_on_an_unreachable_database(tier_env):
    env = {**tier_env, "DATABASE_URL": "postgresql://kaireon:pw-s3cret-x@127.0.0.1:1/app"}
    code, checks, output = check(env)
    assert code == 1
    assert checks["database"]["status"] == "fail"
    assert "unreachable at 127.0.0.1:1/app" in checks["database"]["detail"]
    assert checks["schema"]["status"] == "skip"
    assert checks["broker"]["status"] == "ok"  # every problem is reported, not only the first
    assert "pw-s3cret-x" not in output


def test_check_fails_on_a_missing_schema(pg, tier_env):
    name = f"kaireon_empty_{uuid.uuid4().hex[:8]}"
    url = pg.create_database(name)
    try:
        code, checks, _ = check({**tier_env, "DATABASE_URL": url})
    finally:
        pg.drop_database(name)
    assert code == 5  # the schema is missing: exit 5 (README, exit codes)
    assert checks["database"]["status"] == "ok"
    assert checks["schema"]["status"] == "fail"
    assert "no schema: run `kaireon-pub migrate`" in checks["schema"]["detail"]


def test_check_fails_on_a_dropped_index(tier_env, db):
    db.execute("DROP INDEX outbox_events_claim_idx")
    code, checks, _ = check(tier_env)
    assert code == 1
    assert checks["schema"]["status"] == "fail"
    assert "index outbox_events_claim_idx" in checks["schema"]["detail"]


def test_check_fails_on_a_missing_topic_with_auto_creation_off(tier_env, broker):
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    code, checks, _ = check(tier_env, "--topic", missing, "--no-auto-create")
    assert code == 1
    assert checks["topics"]["status"] == "fail"
    assert f"missing: {missing} (named by --topic)" in checks["topics"]["detail"]
    assert "auto-creation is off" in checks["topics"]["detail"]
    # Looking did not create it (Tansu would auto-create on a metadata request naming it).
    assert missing not in existing_topics(broker.bootstrap)


def test_check_finds_the_topics_of_pending_events(tier_env, broker, db):
    missing = f"pending-only-{uuid.uuid4().hex[:8]}"
    db.execute("INSERT INTO outbox_events (topic, payload) VALUES (%s, '{}')", (missing,))
    code, checks, _ = check(tier_env, "--no-auto-create")
    assert code == 1
    assert f"missing: {missing} (of pending events)" in checks["topics"]["detail"]
    # Declared allowed: the same finding passes.
    code, checks, _ = check(tier_env, "--auto-create")
    assert code == 0 and checks["topics"]["status"] == "ok"


@pytest.mark.parametrize("variable,value,checks_failed", [
    ("KAFKA_ACKS", "1", {"settings", "producer"}),
    ("KAFKA_ENABLE_IDEMPOTENCE", "false", {"settings", "producer"}),
])
def test_check_reports_an_unsafe_producer_setting_by_name(tier_env, variable, value, checks_failed):
    code, checks, output = check({**tier_env, variable: value})
    assert code == 1
    assert {n for n, c in checks.items() if c["status"] == "fail"} == checks_failed
    assert variable in checks["settings"]["detail"] and variable in checks["producer"]["detail"]
    assert checks["database"]["status"] == "ok"


def test_check_reports_inconsistent_timeouts(tier_env):
    # 20 s staleness cannot cover a 10 s message timeout plus a 15 s drain.
    code, checks, _ = check({**tier_env, "OUTBOX_REAPER_STALENESS_SECONDS": "20"})
    assert code == 1
    assert checks["timeouts"]["status"] == "fail"
    assert ("OUTBOX_REAPER_STALENESS_SECONDS=20 must be above KAFKA_MESSAGE_TIMEOUT_MS 10 s"
            in checks["timeouts"]["detail"])


def test_check_fails_on_an_unreachable_broker(tier_env):
    code, checks, _ = check({**tier_env, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert code == 1
    assert checks["broker"]["status"] == "fail" and "unreachable at 127.0.0.1:1" in checks["broker"]["detail"]
    assert checks["topics"]["status"] == "skip"


def test_check_names_the_open_transaction_that_holds_the_claim(tier_env, db_url, db):
    with psycopg.connect(db_url, application_name="billing-batch") as holder:
        holder.execute("SELECT pg_current_xact_id()")  # an open writing transaction
        pid = holder.info.backend_pid
        # A newer event commits: it is what the open transaction holds back.
        db.execute("INSERT INTO outbox_events (topic, payload) VALUES ('t', '{}')")
        code, checks, _ = check(tier_env)
        holder.rollback()
    assert checks["horizon"]["status"] == "warn"
    assert f"pid {pid}" in checks["horizon"]["detail"]
    assert "application billing-batch" in checks["horizon"]["detail"]
    assert "holds the claim" in checks["horizon"]["detail"]
