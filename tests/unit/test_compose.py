"""docker-compose.yml, parsed and cross-checked (no Docker engine runs where the tests do)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from kaireon_pub.settings import KAFKA_PREFIX, SETTING_NAMES, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
TIER = ("migrate", "publisher", "demo")  # the services that run the kaireon-pub image


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def env(service: dict) -> dict[str, str]:
    raw = service.get("environment", {})
    assert isinstance(raw, dict), "use the mapping form of environment"
    return {k: str(v) for k, v in raw.items()}


def test_services_are_the_demo_stack(services):
    assert set(services) == {"postgres", "redpanda", "migrate", "publisher", "demo"}


def test_tier_services_build_this_repo_and_set_only_known_settings(services):
    for name in TIER:
        service = services[name]
        assert (ROOT / service["build"] / "Dockerfile").is_file(), name
        unknown = {k for k in env(service) if k not in SETTING_NAMES and not k.startswith(KAFKA_PREFIX)}
        assert not unknown, f"{name} sets {unknown}, which kaireon_pub.settings does not read"


def test_publisher_environment_is_a_valid_configuration(services):
    """The tier's own parser and cross-field validation accept it (no exit 2 at start)."""
    settings = Settings.from_env(env(services["publisher"]))
    assert settings.cron_secret, "without CRON_SECRET the reaper route answers 401"
    published = {p.split(":")[-1] for p in services["publisher"]["ports"]}
    assert str(settings.http_port) in published
    # docker compose stop must leave the drain budget to finish.
    assert int(services["publisher"]["stop_grace_period"].rstrip("s")) > settings.shutdown_drain_timeout_ms / 1000


def test_migrate_is_a_one_shot_the_tier_waits_for(services):
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("publisher", "demo"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    assert services["publisher"]["depends_on"]["redpanda"]["condition"] == "service_healthy"
    assert services["publisher"]["command"] == ["run"]


def test_demo_runs_the_load_only_demo(services):
    entry = services["demo"]["entrypoint"]
    assert entry[-3:] == ["-m", "kaireon_pub.demo", "--load-only"]


def test_tier_reaches_postgres_and_redpanda_as_configured(services):
    pg = services["postgres"]["environment"]
    for name in TIER:
        dsn = urlsplit(env(services[name])["DATABASE_URL"])
        assert (dsn.hostname, dsn.port or 5432) == ("postgres", 5432), name
        assert (dsn.username, dsn.password, dsn.path.lstrip("/")) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    advertised = next(a for a in services["redpanda"]["command"] if a.startswith("--advertise-kafka-addr="))
    broker = advertised.split("://", 1)[1]
    assert env(services["publisher"])["KAFKA_BOOTSTRAP_SERVERS"] == broker


def test_publisher_runs_with_a_read_only_root_and_tmpfs(services):
    publisher = services["publisher"]
    assert publisher["read_only"] is True and "/tmp" in publisher["tmpfs"]


def test_docker_compose_accepts_the_file():
    """The real parser, where the compose plugin is installed (it needs no engine)."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed")
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
