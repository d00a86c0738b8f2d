"""A bad environment exits 2 with one line naming the variable, before any connection is made."""

import json

import pytest

from tests.helpers import run_cli

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
