"""A bad environment exits 2 with one line naming the variable, before any connection is made."""

import json
import subprocess
import uuid

import psycopg
import pytest

from kaireon_pub import enqueue
from tests.helpers import event_ids, pooled, run_cli, status_counts, wait_for

pytestmark = pytest.mark.broker_agnostic("a bad environment exits before any connection")

# An address where nothing listens: the process must not even try it.
UNREACHABLE = {"DATABASE_URL": "postgresql://u:pw-sentinel-77@10.255.255.1:1/x",
               "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OUTBOX_POLL_INTERVAL_MS": "0"}, "OUTBOX_POLL_INTERVAL_MS"),
        ({"OUTBOX_POLL_INTERVAL_MS": "-100"}, "OUTBOX_POLL_INTERVAL_MS"),
        ({"OUTBOX_POLL_INTERVAL_MS": "two seconds"}, "OUTBOX_POLL_INTERVAL_MS"),
        ({"OUTBOX_BATCH_SIZE": "100000"}, "OUTBOX_BATCH_SIZE"),
        ({"OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS": "20", "OUTBOX_WORKERS": "2"}, "OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS"),
        ({"OUTBOX_BACKOFF_BASE_MS": "9000", "OUTBOX_BACKOFF_MAX_MS": "10"}, "OUTBOX_BACKOFF_MAX_MS"),
        ({"OUTBOX_REAPER_STALENESS_SECONDS": "10"}, "OUTBOX_REAPER_STALENESS_SECONDS"),
        ({"KAFKA_ACKS": "0"}, "KAFKA_ACKS"),
        ({"KAFKA_BOOTSTRAP_SERVERS": ""}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"CRON_SECRET": "pw-sentinel-77"}, "CRON_SECRET"),  # 14 bytes: under 16
        ({"CRON_SECRET": "c" * 32, "CRON_SECRET_PREVIOUS": "old"}, "CRON_SECRET_PREVIOUS"),
    ],
)
def test_bad_env_exits_2_naming_the_variable(env, variable, tmp_path):
    full = {**UNREACHABLE, "OUTBOX_LIVENESS_FILE": str(tmp_path / "alive"), **env}
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "KAFKA_"))}
    result = run_cli("run", env={**base, **full}, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["variable"] == variable
    assert variable in errors[0]["msg"] and "accepted" in errors[0]["msg"]
    assert errors[0]["errorId"]
    assert "pw-sentinel-77" not in result.stderr + result.stdout
    assert not (tmp_path / "alive").exists()


def test_unknown_librdkafka_property_exits_2_naming_the_variable(tmp_path, pg):
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "KAFKA_"))}
    env = {**base, "DATABASE_URL": pg.url("postgres"), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
           "KAFKA_NOT_A_SETTING": "1", "OUTBOX_WORKERS": "1", "OUTBOX_HTTP_PORT": "0",
           "OUTBOX_LIVENESS_FILE": str(tmp_path / "alive"), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    result = run_cli("run", env=env, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    invalid = [line for line in lines if line.get("event") == "config invalid"]
    assert invalid and invalid[0]["variable"] == "KAFKA_NOT_A_SETTING"
    assert "No such configuration property" in invalid[0]["problem"]


# ---- issue 12: config dies before the fork; service links are not librdkafka properties ------------

# What Kubernetes injects into every pod of a namespace with a Service named `kafka`.
KAFKA_SERVICE_LINKS = {
    "KAFKA_PORT": "tcp://127.0.0.1:9092",
    "KAFKA_SERVICE_HOST": "127.0.0.1",
    "KAFKA_SERVICE_PORT": "9092",
    "KAFKA_SERVICE_PORT_KAFKA": "9092",
    "KAFKA_PORT_9092_TCP": "tcp://127.0.0.1:9092",
    "KAFKA_PORT_9092_TCP_PROTO": "tcp",
    "KAFKA_PORT_9092_TCP_PORT": "9092",
    "KAFKA_PORT_9092_TCP_ADDR": "127.0.0.1",
}


def _exit_within(tier, timeout: float) -> int | None:
    try:
        return tier.wait_exit(timeout)
    except subprocess.TimeoutExpired:
        return None


def test_kubernetes_service_link_variables_leave_the_tier_running(db_url, topic, start_tier, topic_reader):
    tier = start_tier(OUTBOX_WORKERS="2", **KAFKA_SERVICE_LINKS)
    with psycopg.connect(db_url) as conn:
        event_id = enqueue(conn, topic=topic, key="k", payload={"x": 1})
        conn.commit()
    wait_for(lambda: status_counts(db_url) == {"published": 1} or tier.proc.poll() is not None, 30,
             "the event published (or the tier gone)", interval=0.1)
    problems = [line for line in tier.logs() if line.get("event") in ("config invalid", "worker crashed")]
    assert tier.proc.poll() is None, f"the tier exited {tier.proc.poll()}: {problems[:2]}"
    assert problems == [], problems[:2]
    assert event_ids(topic_reader(topic).read_count(1, timeout=30)) == [event_id]
    assert tier.stop() == 0


def test_unknown_librdkafka_property_exits_2_before_any_worker_is_spawned(pg, tmp_path, start_tier):
    tier = start_tier(db_url=pg.url("postgres"), bootstrap="127.0.0.1:1", OUTBOX_WORKERS="2", KAFKA_NOT_A_REAL_KEY="1")
    code = _exit_within(tier, 60)
    assert code == 2, f"exit {code}"
    lines = tier.logs()
    invalid = [line for line in lines if line.get("event") == "config invalid"]
    assert invalid and invalid[0]["variable"] == "KAFKA_NOT_A_REAL_KEY", invalid
    spawned = [line for line in lines if line.get("event") == "worker spawned"]
    assert spawned == [], f"{len(spawned)} workers were spawned before the configuration was refused"
    assert not (tmp_path / "alive").exists()


@pytest.mark.parametrize("dsn", [
    "postgresql://app:S3cretPW@[::1",
    "host=127.0.0.1 port=notaport user=app password=S3cretPW",
], ids=["unclosed-bracket", "port-not-a-number"])
def test_malformed_database_url_exits_2_before_any_worker_naming_it_without_the_password(dsn, start_tier):
    tier = start_tier(db_url=dsn, bootstrap="127.0.0.1:1", OUTBOX_WORKERS="2")
    code = _exit_within(tier, 30)
    if code is None:
        tier.stop()
    output = tier.log_path.read_text(errors="replace")
    lines = tier.logs()
    assert "S3cretPW" not in output, [line.get("msg") for line in lines if "S3cretPW" in str(line)][:2]
    assert code == 2, f"still running after 30 s ({len(lines)} log lines)" if code is None else f"exit {code}"
    invalid = [line for line in lines if line.get("event") == "config invalid"]
    assert invalid and invalid[0]["variable"] == "DATABASE_URL", invalid
    assert [line for line in lines if line.get("event") == "worker spawned"] == []


def test_an_unknown_database_role_exits_3_within_two_minutes_with_the_servers_reason(pg, start_tier):
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    dsn = psycopg.conninfo.make_conninfo(pg.url("postgres"), user=role)
    # Through PgBouncer (KAIREON_TEST_VIA_PGBOUNCER; auth_type=trust) the pooler refuses the role
    # itself: it is not in PgBouncer's auth_file.
    reason = '"trust" authentication failed' if pooled(dsn) else f'role "{role}" does not exist'
    tier = start_tier(db_url=dsn, bootstrap="127.0.0.1:1", OUTBOX_POLL_INTERVAL_MS="10")
    code = _exit_within(tier, 120)
    failures = [line for line in tier.logs() if line.get("msg") == "outbox-publisher tick failed"]
    assert code == 3, (f"exit {code} after 120 s; {len(failures)} tick failures, "
                       f"transient: {sorted({line.get('isTransient') for line in failures}, key=str)}, "
                       f"last: {failures[-1].get('error') if failures else None}")
    assert failures
    assert all(reason in line["error"] for line in failures), [line["error"] for line in failures][:3]
    assert any(line.get("event") == "giving up" for line in tier.logs())
