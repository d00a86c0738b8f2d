"""SASL_SSL against a real Apache Kafka (issue 23): the configuration path operators use in
production. One broker with a SASL_SSL listener (SCRAM-SHA-512 over TLS, a CA of the test's own)
beside its PLAINTEXT one, which the test's readers use.

The tier gets librdkafka's settings as KAFKA_* variables (KAFKA_SECURITY_PROTOCOL=SASL_SSL,
KAFKA_SASL_MECHANISMS, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD, KAFKA_SSL_CA_LOCATION), as an
operator would set them. The password must appear in no output: the tier's log, `kaireon-pub
status`, `kaireon-pub check`.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from kaireon_pub.settings import kafka_env_name
from tests import helpers
from tests.e2e.test_kafka_faults import steady
from tests.helpers import TopicReader, event_ids, run_cli, status_counts, tier_env, wait_for

pytestmark = pytest.mark.not_via_pgbouncer("the broker's security is the subject; these tests run once, directly")

USER = "kaireon"


@pytest.fixture(scope="module")
def sasl(kafka_sasl) -> Any:
    """tests/conftest.py's session `kafka_sasl` (skips, with the reason, without Java or Maven)."""
    return kafka_sasl


def sasl_env(sasl, db_url: str, tmp_path: Path, *, password: str | None = None, ca: Path | None = None,
             **overrides: str) -> dict[str, str]:
    """The tier's environment: every librdkafka setting of the SASL_SSL listener as its KAFKA_* variable."""
    config = dict(sasl.sasl_client_config(USER))
    if password is not None:
        config["sasl.password"] = password
    if ca is not None:
        config["ssl.ca.location"] = str(ca)
    bootstrap = config.pop("bootstrap.servers")
    env = tier_env(db_url, bootstrap, tmp_path, **{kafka_env_name(k): v for k, v in config.items()})
    env.update(overrides)
    return env


def new_topic(sasl) -> str:
    topic = f"ks-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": sasl.bootstrap, "log_level": 0})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)
    return topic


def all_output(tier) -> str:
    return tier.log_path.read_text(errors="replace")


def commit(db_url: str, topic: str, n: int) -> list[int]:
    from kaireon_pub import Event

    return helpers.commit(db_url, [Event(topic, f"k{i % 5}", {"i": i}) for i in range(n)])


def test_the_tier_publishes_with_scram_over_tls_and_the_password_is_in_no_output(db_url, sasl, tmp_path, run_tier):
    topic = new_topic(sasl)
    ids = commit(db_url, topic, 200)
    env = sasl_env(sasl, db_url, tmp_path)
    password = env["KAFKA_SASL_PASSWORD"]
    tier = run_tier(env)
    with TopicReader(sasl.bootstrap, topic) as reader:
        messages = reader.read_until(lambda msgs: set(ids) <= set(event_ids(msgs)), 60)
    wait_for(lambda: status_counts(db_url) == {"published": 200}, 30, "200 rows published")
    status = run_cli("status", env=env)
    check = run_cli("check", "--topic", topic, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert tier.stop() == 0
    assert sorted(set(event_ids(messages))) == sorted(ids)
    for what, text in (("the tier's log", all_output(tier)), ("status", status.stdout + status.stderr),
                       ("check", check.stdout + check.stderr)):
        assert password not in text, f"the SASL password is in {what}"
    # The check did reach the broker through SASL_SSL (it names the listener's address).
    assert sasl.sasl_bootstrap.split(",")[0] in check.stdout or "broker" in check.stdout.lower()


def test_the_broker_restarted_with_its_data_the_idempotent_producer_goes_on(db_url, sasl, tmp_path, run_tier):
    """A single broker killed (-9) and started again with its log and its producer state: the
    tier reconnects (TLS and SCRAM again), nothing lost, duplicates within what it counted, no
    fatal error of the idempotent producer and no new cluster id (the data was kept)."""
    topic = new_topic(sasl)
    node = sasl.node_ids[0]
    env = sasl_env(sasl, db_url, tmp_path)
    with steady(db_url, sasl.bootstrap, topic, tmp_path, run_tier, env=env, partitions=3) as run:
        mark = run.committed_so_far()
        down_at = time.monotonic()
        sasl.kill_node(node)
        sasl.start_node(node)
        back_s = time.monotonic() - down_at
        resume_s = run.wait_flowing(mark, 60)
        figures = run.finish()
    logs = run.tier.logs()
    assert not figures["fatal"], figures["fatal"][:3]
    assert not [e for e in logs if e.get("event") == "cluster changed"]
    print(f"\n[kafka-sasl] single broker kill -9 and restart with data: brokerBackS={back_s:.2f}, "
          f"flowingAgainAfterS={resume_s:.2f}, events={figures['events']}, duplicates={figures['duplicates']}, "
          f"counted={figures['counted']}, producerRecreated={[e.get('cause') for e in figures['recreated']]}")


WRONG_PASSWORD = "Authentication failed during authentication due to invalid credentials"
UNKNOWN_CA = "certificate verify failed"
def refused_tier(sasl, db_url, tmp_path, run_tier, **change) -> tuple[Any, dict[str, str]]:
    topic = new_topic(sasl)
    commit(db_url, topic, 5)
    env = sasl_env(sasl, db_url, tmp_path, OUTBOX_MAX_CONSECUTIVE_FAILURES="3", KAFKA_MESSAGE_TIMEOUT_MS="2000",
                   **change)
    return run_tier(env), env


def unsent(db_url: str) -> int:
    """Rows pending or claimed (processing); 0 if any was published or failed."""
    counts = status_counts(db_url)
    return 0 if set(counts) - {"pending", "processing"} else sum(counts.values())


def another_ca(tmp_path: Path) -> Path:
    """A CA certificate that did not sign the broker's."""
    ca = tmp_path / "other-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "other.key"),
                    "-out", str(ca), "-days", "1", "-subj", "/CN=not the broker's CA"],
                   check=True, capture_output=True, timeout=60)
    return ca


def librdkafka_says(tier, text: str, timeout: float = 30) -> None:
    tier.wait_log(lambda e: e.get("logger") == "kaireon_pub.librdkafka" and text in e.get("msg", ""), timeout,
                  f"librdkafka's line saying {text!r}")


def test_a_wrong_password_is_named_publishes_nothing_and_is_in_no_output(db_url, sasl, tmp_path, run_tier):
    wrong = "not-" + uuid.uuid4().hex
    tier, env = refused_tier(sasl, db_url, tmp_path, run_tier, password=wrong)
    librdkafka_says(tier, WRONG_PASSWORD)
    # A tick failed: the 5 events are still pending (or claimed again), none published, none failed.
    wait_for(lambda: [e for e in tier.logs() if e.get("event") == "tick failed"], 30, "a failed tick")
    assert unsent(db_url) == 5, status_counts(db_url)
    status = run_cli("status", env=env)
    check = run_cli("check", env=env)
    assert check.returncode != 0, check.stdout
    assert "FAIL  broker" in check.stdout, check.stdout
    tier.stop()
    for what, text in (("the tier's log", all_output(tier)), ("status", status.stdout + status.stderr),
                       ("check", check.stdout + check.stderr)):
        assert wrong not in text, f"the wrong SASL password is in {what}"


def test_a_ca_that_does_not_match_is_named_and_publishes_nothing(db_url, sasl, tmp_path, run_tier):
    tier, env = refused_tier(sasl, db_url, tmp_path, run_tier, ca=another_ca(tmp_path))
    librdkafka_says(tier, UNKNOWN_CA)
    wait_for(lambda: [e for e in tier.logs() if e.get("event") == "tick failed"], 30, "a failed tick")
    assert unsent(db_url) == 5, status_counts(db_url)
    check = run_cli("check", env=env)
    assert check.returncode != 0, check.stdout
    assert "FAIL  broker" in check.stdout, check.stdout
    tier.stop()


def test_a_wrong_password_exits_3_after_the_streak_naming_the_broker_s_reason(db_url, sasl, tmp_path, run_tier):
    """(A CA that does not match goes the same way, through librdkafka's _SSL: seen, not run twice.)"""
    tier, _ = refused_tier(sasl, db_url, tmp_path, run_tier, password="not-" + uuid.uuid4().hex)
    # Three non-transient ticks of a few seconds each (message.timeout.ms 2 s): well within 15 s.
    try:
        code = tier.wait_exit(15)
    except subprocess.TimeoutExpired:
        code = None
    failures = [e for e in tier.logs() if e.get("msg") == "outbox-publisher tick failed"]
    assert code == 3, f"exit {code}; tick failures: {sorted({e.get('error') for e in failures})}"
    assert all(e["isTransient"] is False for e in failures[-3:])
    assert WRONG_PASSWORD in failures[-1]["error"], failures[-1]


@pytest.mark.parametrize("refusal", ["wrong password", "unknown CA"])
def test_check_names_the_broker_s_reason_for_refusing(refusal, db_url, sasl, tmp_path):
    if refusal == "wrong password":
        env, reason = sasl_env(sasl, db_url, tmp_path, password="not-" + uuid.uuid4().hex), "Authentication failed"
    else:
        env, reason = sasl_env(sasl, db_url, tmp_path, ca=another_ca(tmp_path)), UNKNOWN_CA
    check = run_cli("check", env=env)
    assert check.returncode != 0, check.stdout
    assert reason in check.stdout, check.stdout
