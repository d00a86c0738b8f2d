"""Secrets from files, end to end (issue 26): the tier runs on DATABASE_URL_FILE (a password the
server checks), CRON_SECRET_FILE, CRON_SECRET_PREVIOUS_FILE and KAFKA_SASL_PASSWORD_FILE; a rotated
CRON_SECRET_FILE takes effect without a restart; and no secret appears in the tier's log or in the
output of `migrate`, `status`, `check` and `reap` (a sentinel grep).

The grep covers every secret librdkafka property the redaction knows (tests/unit/test_redact.py's
SECRET_PROPERTIES), each with its own sentinel: sasl.password and ssl.key.pem (a PEM-shaped key,
several lines) from KAFKA_*_FILE files, the others inline as KAFKA_* variables. librdkafka accepts
them all at producer creation under the PLAINTEXT protocol of the test broker (it loads no key and
calls no token endpoint), so the tier itself runs with every one of them, not only the commands."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid

import psycopg
import pytest

from kaireon_pub.settings import kafka_env_name
from tests import helpers
from tests.e2e.test_secrets import checking_pg  # noqa: F401  (a module's own private server)
from tests.unit.test_redact import SECRET_PROPERTIES

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


# Given from a file (KAFKA_*_FILE); every other secret property is given inline.
KAFKA_FROM_FILES = ("sasl.password", "ssl.key.pem")


def pem(body: str) -> str:
    """A value shaped like an inline private key, the sentinel in each of its body lines."""
    return f"-----BEGIN PRIVATE KEY-----\nMIIEv{body}AAA\nQQ{body}BB==\n-----END PRIVATE KEY-----\n"


def test_the_tier_runs_on_secret_files_shows_none_of_them_and_takes_a_rotated_cron_secret(
        checking_pg, broker, run_tier, tmp_path):  # noqa: F811
    token = uuid.uuid4().hex[:10]
    db_password, cron, previous, rotated = (f"Sntl{kind}{token}Fq" for kind in ("Db", "Cron", "Previous", "Rotated"))
    kafka = {prop: f"Sntl{prop.replace('.', '')}{token}Fq" for prop in SECRET_PROPERTIES}
    sentinels = (db_password, cron, previous, rotated, *kafka.values())
    assert len(set(sentinels)) == len(sentinels) and not any(a in b for a in sentinels for b in sentinels if a != b)
    with psycopg.connect(checking_pg, autocommit=True) as admin:
        admin.execute(f"ALTER ROLE app PASSWORD '{db_password}'")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    given = {prop: pem(value) if prop.endswith(".pem") else value for prop, value in kafka.items()}
    files = {"DATABASE_URL_FILE": psycopg.conninfo.make_conninfo(checking_pg, user="app", dbname="app",
                                                                 password=db_password),
             "CRON_SECRET_FILE": cron, "CRON_SECRET_PREVIOUS_FILE": previous,
             **{kafka_env_name(prop) + "_FILE": given[prop] for prop in KAFKA_FROM_FILES}}
    inline = {kafka_env_name(prop): value for prop, value in given.items() if prop not in KAFKA_FROM_FILES}
    env = helpers.tier_env("unused", broker.bootstrap, tmp_path, KAFKA_SASL_USERNAME="svc", **inline)
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
    assert cron_call(port, previous) == 200  # the rotation window: CRON_SECRET_PREVIOUS_FILE's secret

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
    assert started and {prop: started[0]["producer"].get(prop) for prop in kafka} == dict.fromkeys(kafka, "***")
    assert any(line.get("event") == "cron secret reloaded" for line in tier.logs())
    leaks = [(s, text[max(0, text.find(s) - 200):text.find(s) + 50]) for text in [log, *outputs]
             for s in sentinels if s in text]
    assert leaks == []
