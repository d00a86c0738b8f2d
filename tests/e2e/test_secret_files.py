"""Secrets from files, end to end (issue 26): the tier runs on DATABASE_URL_FILE (a password the
server checks), CRON_SECRET_FILE and KAFKA_SASL_PASSWORD_FILE; a rotated CRON_SECRET_FILE takes
effect without a restart; and no value read from a file appears in the tier's log or in the
output of `migrate`, `status`, `check` and `reap` (a sentinel grep)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid

import psycopg
import pytest

from tests import helpers
from tests.e2e.test_secrets import checking_pg  # noqa: F401  (a module's own private server)

pytestmark = pytest.mark.broker_agnostic(
    "secrets read from files; no broker authenticates here (SASL is test_kafka_sasl's)")

CRON_PATH = "/api/v1/cron/outbox-reaper"


def cron_call(port: int, secret: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{CRON_PATH}", method="POST", data=b"",
                                     headers={"Authorization": f"Bearer {secret}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as resp:
            return resp.status
    except (urllib.error.HTTPError, urllib.error.URLError) as exc:
        return getattr(exc, "code", 0)


def rotate(path, value: str) -> None:
    """A new file swapped in under the same name, as a Secret volume's update does."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)


def test_the_tier_runs_on_secret_files_shows_none_of_them_and_takes_a_rotated_cron_secret(
        checking_pg, broker, run_tier, tmp_path):  # noqa: F811
    token = uuid.uuid4().hex[:10]
    db_password, cron, rotated, sasl = (f"Sntl{kind}{token}Fq" for kind in ("Db", "Cron", "Rotated", "Sasl"))
    sentinels = (db_password, cron, rotated, sasl)
    with psycopg.connect(checking_pg, autocommit=True) as admin:
        admin.execute(f"ALTER ROLE app PASSWORD '{db_password}'")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    files = {"DATABASE_URL_FILE": psycopg.conninfo.make_conninfo(checking_pg, user="app", dbname="app",
                                                                 password=db_password),
             "CRON_SECRET_FILE": cron, "KAFKA_SASL_PASSWORD_FILE": sasl}
    env = helpers.tier_env("unused", broker.bootstrap, tmp_path, KAFKA_SASL_USERNAME="svc")
    for name in ("DATABASE_URL", "OUTBOX_POOL_MODE", "OUTBOX_LISTEN_DATABASE_URL"):
        env.pop(name, None)  # the private server is reached directly
    for name, value in files.items():
        (secrets / name).write_text(value + "\n")
        env[name] = str(secrets / name)

    outputs: list[str] = []
    migrated = helpers.run_cli("migrate", env=env)
    outputs += [migrated.stdout, migrated.stderr]
    assert migrated.returncode == 0, migrated.stderr[-2000:]

    tier = run_tier(env)
    port = tier.http_port()
    helpers.wait_for(lambda: readyz(port) == 200, 60, "/readyz 200: the database password from its file")
    assert cron_call(port, cron) == 200

    rotate(secrets / "CRON_SECRET_FILE", rotated)
    helpers.wait_for(lambda: cron_call(port, rotated) == 200, 10, "the rotated cron secret accepted")
    assert cron_call(port, cron) == 401

    env["CRON_SECRET_FILE"] = str(secrets / "CRON_SECRET_FILE")
    for command in ("status", "check", "reap"):
        done = helpers.run_cli(command, *(("--json",) if command == "check" else ()), env=env, timeout=120)
        outputs += [done.stdout, done.stderr]
        if command != "check":  # check may find something to report (the broker's checks are not this test's)
            assert done.returncode == 0, (command, done.stderr[-2000:])
            continue
        checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
        for name in ("settings", "database", "pooler", "schema"):  # the database of DATABASE_URL_FILE
            assert checks[name]["status"] == "ok", (name, checks[name]["detail"])
    assert tier.stop() == 0

    log = tier.log_path.read_text(errors="replace")
    started = [line for line in tier.logs() if line.get("event") == "supervisor started"]
    assert started and started[0]["producer"]["sasl.password"] == "***"
    assert any(line.get("event") == "cron secret reloaded" for line in tier.logs())
    leaks = [(s, text[max(0, text.find(s) - 200):text.find(s) + 50]) for text in [log, *outputs]
             for s in sentinels if s in text]
    assert leaks == []
