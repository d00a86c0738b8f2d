"""docker-compose.yml, parsed and cross-checked (no Docker engine runs where the tests do)."""

from __future__ import annotations

import re
import shlex
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
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def env(service: dict) -> dict[str, str]:
    raw = service.get("environment", {})
    assert isinstance(raw, dict), "use the mapping form of environment"
    return {k: str(v) for k, v in raw.items()}


def test_services_are_the_demo_stack(services):
    assert set(services) == {"postgres", "redpanda", "migrate", "publisher", "demo"}


def test_tier_image_is_built_once_and_sets_only_known_settings(services):
    builders = [name for name, service in services.items() if "build" in service]
    assert builders == ["publisher"], f"one service builds the tier image, not {builders}"
    build = services["publisher"]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert (ROOT / context / "Dockerfile").is_file()
    image = services["publisher"]["image"]
    for name in TIER:
        service = services[name]
        assert service["image"] == image, f"{name} runs another image than the one built"
        if name != "publisher":
            # Never pulled: the image exists only once the publisher service has built it.
            assert service.get("pull_policy") == "never", name
        unknown = {k for k in env(service) if k not in SETTING_NAMES and not k.startswith(KAFKA_PREFIX)}
        assert not unknown, f"{name} sets {unknown}, which kaireon_pub.settings does not read"


def test_publisher_environment_is_a_valid_configuration(services):
    """The tier's own parser and cross-field validation accept it (no exit 2 at start)."""
    settings = Settings.from_env(env(services["publisher"]))
    assert settings.cron_secret, "without CRON_SECRET the reaper route answers 401"
    assert str(settings.http_port) in {p.split(":")[-1] for p in services["publisher"]["ports"]}
    # docker compose stop must leave the drain budget to finish.
    assert int(services["publisher"]["stop_grace_period"].rstrip("s")) > settings.shutdown_drain_timeout_ms / 1000


def test_ports_are_published_on_localhost_only(services):
    for name, service in services.items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port} is open to the network"


def test_migrate_is_a_one_shot_the_tier_waits_for(services):
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("publisher", "demo"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    assert services["publisher"]["depends_on"]["redpanda"]["condition"] == "service_healthy"
    assert services["publisher"]["command"] == ["run"]


def healthcheck(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
    return test


def test_every_dependency_waits_on_a_real_healthcheck(services):
    """service_healthy everywhere a service waits on a long-running one, and each of those has a
    check that proves it serves: pg_isready, rpk cluster health, the tier's /readyz."""
    for name, service in services.items():
        for dependency, wait in service.get("depends_on", {}).items():
            if dependency == "migrate":
                continue  # a one-shot: service_completed_successfully (above)
            assert wait["condition"] == "service_healthy", f"{name} waits on {dependency} only being started"
            assert not services[dependency].get("healthcheck", {}).get("disable"), dependency
    assert healthcheck(services["postgres"])[1:4] == ["pg_isready", "-U",
                                                      services["postgres"]["environment"]["POSTGRES_USER"]]
    assert re.search(r"\brpk cluster health\b.*Healthy:.+true", " ".join(healthcheck(services["redpanda"])[1:]))
    settings = Settings.from_env(env(services["publisher"]))
    check = healthcheck(services["publisher"])
    assert check[1:3] == ["python", "-c"], "the image has python, not curl"
    assert f"http://127.0.0.1:{settings.http_port}/readyz" in check[3]
    compile(check[3], "healthcheck", "exec")  # the one-liner is valid Python
    assert services["demo"]["depends_on"]["publisher"]["condition"] == "service_healthy"


def test_demo_runs_the_load_only_demo(services):
    entry = services["demo"]["entrypoint"]
    assert entry[-3:] == ["-m", "kaireon_pub.demo", "--load-only"]


def test_tier_reaches_postgres_and_redpanda_as_configured(services):
    pg = services["postgres"]["environment"]
    for name in TIER:
        dsn = urlsplit(env(services[name])["DATABASE_URL"])
        assert (dsn.hostname, dsn.port or 5432) == ("postgres", 5432), name
        assert ((dsn.username, dsn.password, dsn.path.lstrip("/"))
                == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]))
    _, advertised = listeners_of(services["redpanda"])
    for name in TIER:
        assert env(services[name])["KAFKA_BOOTSTRAP_SERVERS"] == advertised["internal"], name


def listeners_of(redpanda: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(listen, advertise): listener name -> host:port, from redpanda start's flags."""
    def flag(name: str) -> dict[str, str]:
        (value,) = [a.split("=", 1)[1] for a in redpanda["command"] if a.startswith(f"--{name}=")]
        return dict(item.split("://", 1) for item in value.split(","))
    return flag("kafka-addr"), flag("advertise-kafka-addr")


def test_redpanda_from_its_registry_with_an_internal_and_a_host_listener(services):
    redpanda = services["redpanda"]
    image, tag = redpanda["image"].rsplit(":", 1)
    assert image == "docker.redpanda.com/redpandadata/redpanda"
    assert re.fullmatch(r"v25\.\d+\.\d+", tag), tag
    listeners, advertised = listeners_of(redpanda)
    assert set(listeners) == set(advertised) == {"internal", "external"}
    assert advertised["internal"].split(":")[0] == "redpanda"  # the compose service name
    host, port = advertised["external"].split(":")
    assert host == "localhost", "host tools connect to what the broker advertises"
    assert listeners["external"].endswith(f":{port}") and listeners["internal"] != listeners["external"]
    assert f"127.0.0.1:{port}:{port}" in redpanda["ports"]


def test_publisher_runs_with_a_read_only_root_and_tmpfs(services):
    publisher = services["publisher"]
    assert publisher["read_only"] is True and "/tmp" in publisher["tmpfs"]


def test_one_cron_secret_for_compose_make_run_and_the_readme(services):
    secret = env(services["publisher"])["CRON_SECRET"]
    # `make run` (kaireon_pub/demo.py) uses the same value, so the README's curl line fits both.
    assert f'"{secret}"' in (ROOT / "kaireon_pub" / "demo.py").read_text()
    docker_section = README.read_text().split("## Try it with Docker", 1)[1].split("\n## ", 1)[0]
    used = set(re.findall(r"x-cron-secret: ([^'\"\s]+)", docker_section))
    used |= set(re.findall(r"Authorization: Bearer ([^'\"\s]+)", docker_section))
    assert used == {secret}, f"the README's Docker example uses {used}, compose sets {secret!r}"


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")  # Debian's docker-compose package
    return [standalone] if standalone else None


def test_docker_compose_accepts_the_file():
    """The real parser and schema, where a compose CLI is installed (`config` needs no engine)."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither docker compose nor docker-compose is installed")
    done = subprocess.run([*cli, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, shlex.join(cli) + ": " + done.stderr
